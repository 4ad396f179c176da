"""The public Python API example of docs/architecture.md runs as written (tiny models, 2 steps)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_train_guard import write_tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def api_example() -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/architecture.md: the api-example block is missing"
    return m.group(1)


def test_public_api_exports():
    import eval
    import mood_data
    import train

    for mod in (train, eval):
        for name in mod.__all__:
            assert getattr(mod, name) is not None
    assert callable(mood_data.load_splits)
    with pytest.raises(AttributeError):
        train.no_such_name  # noqa: B018


def test_docs_example_runs(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys):
    recipe = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                               eval={"batch_size": 8, "max_length": 48, "knn": {"k": 3, "max_ref": 100},
                                     "mahalanobis": {"layers": [-1]}})
    env = {"RECIPE": str(recipe), "BUNDLE": str(tmp_path / "bundle")}
    exec(compile(api_example(), str(DOC), "exec"), env)
    score = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert score == score  # a number, not NaN
    assert (tmp_path / "run" / "eval" / "guard+maha" / "analysis.json").is_file()
    assert (tmp_path / "bundle" / "monitor.json").is_file()
    assert env["rows"][0]["score"] == pytest.approx(score)
