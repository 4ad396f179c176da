"""Where the embedded assets live: the MOOD benchmark files and the tiny backbones.

The assets sit in the ``mood_data/embedded/`` folder next to this module (a plain data folder,
not a package, so ``import mood_data.embedded`` resolves to this file)::

    embedded/benchmark/{train,test}.jsonl.gz   built by ``moodguard data build``
    embedded/models/tiny-{s,m,l}/              built by ``moodguard models build``
"""
from __future__ import annotations

from pathlib import Path

from .errors import DataError

EMBEDDED_PREFIX = "embedded:"
ASSETS_DIR = Path(__file__).resolve().parent / "embedded"


def benchmark_dir() -> Path:
    """The folder holding the embedded benchmark's ``train.jsonl.gz`` / ``test.jsonl.gz``."""
    return ASSETS_DIR / "benchmark"


def models_dir() -> Path:
    """The folder holding the embedded tiny backbones (one HF folder each)."""
    return ASSETS_DIR / "models"


def is_embedded(name: object) -> bool:
    return isinstance(name, str) and name.startswith(EMBEDDED_PREFIX)


def model_path(name: str | Path, *, must_exist: bool = True) -> str | Path:
    """Resolve ``embedded:tiny-s`` to ``mood_data/embedded/models/tiny-s``.

    Anything else (a local path, a hub id) is returned unchanged. A missing embedded model is
    a :class:`DataError` unless ``must_exist`` is false.
    """
    if not is_embedded(name):
        return name
    short = str(name)[len(EMBEDDED_PREFIX):]
    if not short or "/" in short or "\\" in short or short in (".", ".."):
        raise DataError(f"{name}: not a valid embedded model name (e.g. embedded:tiny-s)")
    path = models_dir() / short
    if must_exist and not path.is_dir():
        raise DataError(f"{name}: embedded model not found at {path} (build it with `moodguard models build`)")
    return path


def default_tokenizer_path() -> Path | None:
    """The embedded tiny-s folder when it has been built, else ``None``."""
    path = models_dir() / "tiny-s"
    return path if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file() else None
