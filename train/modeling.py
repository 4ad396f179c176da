"""Loading backbones, tokenizers and adapters (shared by training and eval).

The guard loads the mood-bench way::

    AutoModelForSequenceClassification.from_pretrained(base, num_labels=<rows of score.weight>)
    PeftModel.from_pretrained(model, adapter_dir)

where ``num_labels`` is read from the ``score.weight`` tensor stored inside
``adapter_model.safetensors`` (the head is saved there through peft's ``modules_to_save``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mood_data.errors import BundleError, RecipeError
from mood_data.readers import short_repr

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_model(name: str | os.PathLike) -> str:
    """``embedded:tiny-s`` -> the shipped folder; ``converted:smollm2-135m-instruct`` -> the
    folder ``moodguard models convert --packaged`` wrote; anything else (hub id, path) unchanged."""
    name = str(name)
    if name.startswith("converted:"):
        from train.convert import ConversionError, converted_path

        try:
            return str(converted_path(name))
        except ConversionError as exc:
            raise RecipeError(f"model {name!r}: {exc}") from None
    if not name.startswith("embedded:"):
        return name
    try:
        from mood_data.embedded import model_path  # type: ignore

        return str(model_path(name))
    except (ImportError, AttributeError):
        path = REPO_ROOT / "mood_data" / "embedded" / "models" / name.split(":", 1)[1]
        if not path.is_dir():
            raise RecipeError(f"model {name!r}: embedded model folder not found: {path}") from None
        return str(path)


def torch_dtype(name: str | Any):
    import torch

    if not isinstance(name, str):
        return name
    if name == "auto":
        return "auto"
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise RecipeError(f"dtype {name!r}: expected bfloat16, float16, float32 or auto") from None


def load_tokenizer(name: str | os.PathLike, trust_remote_code: bool = False):
    """Tokenizer with a pad token, left padding and LEFT truncation (the end of a
    conversation, where the assistant answers, is what the guard must see)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "left"
    tok.truncation_side = "left"
    return tok


def adapter_num_labels(adapter_dir: str | os.PathLike) -> int:
    """Rows of the ``score.weight`` tensor saved in the adapter (the mood-bench way)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise BundleError(f"{path}: adapter weights not found")
    with safe_open(str(path), framework="pt") as fh:
        keys = [k for k in fh.keys() if k.endswith("score.weight")]
        if not keys:
            raise BundleError(f"{path}: field 'score.weight': no classification head in the adapter")
        return int(fh.get_slice(keys[0]).get_shape()[0])


def without_embedding_tables(model):
    """Make ``model.save_pretrained`` (Trainer's saves, checkpoints included) write the adapter
    only. peft otherwise copies the whole embedding table into the adapter whenever a LoRA
    targets ``embed_tokens`` (``save_embedding_layers='auto'``); the table is the base model's,
    frozen and not resized, so the LoRA factors and the head are all the adapter needs. Without
    this a ZeRO-3 save (gathered parameters) and a one-process save differ in their keys."""
    import functools

    model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
    return model


def load_guard_model(base: str | os.PathLike, adapter_dir: str | os.PathLike | None = None, dtype="float32",
                     trust_remote_code: bool = False, num_labels: int = 2, **kwargs):
    """Sequence-classification backbone (+ the guard adapter when ``adapter_dir`` is given)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    if adapter_dir is not None:
        num_labels = adapter_num_labels(adapter_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(base), num_labels=num_labels, dtype=torch_dtype(dtype),
        trust_remote_code=trust_remote_code, **kwargs,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = _pad_id(base, trust_remote_code)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model


def load_causal_lm(base: str | os.PathLike, adapter_dir: str | os.PathLike | None = None, dtype="float32",
                   trust_remote_code: bool = False, **kwargs):
    """Causal LM backbone (+ the perplexity-reference adapter when ``adapter_dir`` is given)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(base), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs,
    )
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model


def _pad_id(base, trust_remote_code: bool) -> int | None:
    try:
        return load_tokenizer(base, trust_remote_code).pad_token_id
    except Exception:  # noqa: BLE001 - no tokenizer next to the weights; leave unset
        return None


def count_parameters(model_or_config: Any) -> int:
    """Backbone parameters of the base model (no LoRA weights, no classification/LM head
    beyond the tied embeddings): the x axis of the scaling chart.

    Accepts a model (peft-wrapped or not), a ``PretrainedConfig``, or a model name/path (only
    its ``config.json`` is read; the count is exact because the model is built on the meta
    device).
    """
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    obj = model_or_config
    if isinstance(obj, (str, os.PathLike)):
        obj = AutoConfig.from_pretrained(resolve_model(obj))
    if isinstance(obj, PretrainedConfig):
        import torch

        with torch.device("meta"):
            obj = AutoModel.from_config(obj)
    base = obj
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    backbone = getattr(base, "base_model", base)
    seen: set[int] = set()
    total = 0
    for name, p in backbone.named_parameters():
        if "lora_" in name or "modules_to_save" in name or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return int(total)


def save_versions() -> dict:
    """Library versions recorded next to every adapter (``versions.json``)."""
    import platform

    import accelerate
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def _module_names(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def target_problem(model, target_modules: Any) -> str | None:
    """Why LoRA ``target_modules`` (a list of module names, a regex string, or 'all-linear')
    match no module of ``model`` (peft's suffix / full-match rules), or None."""
    import re

    names = _module_names(model)
    if target_modules == "all-linear" or target_modules is None:
        return None
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            return f"{short_repr(target_modules)} is not a valid regular expression ({exc})"
        return None if any(pattern.fullmatch(n) for n in names) else \
            f"{short_repr(target_modules)} matches no module of the base model"
    if not isinstance(target_modules, list) or not all(isinstance(t, str) and t for t in target_modules):
        return f"expected a list of module names, got {short_repr(target_modules)}"
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "in_features")})
    for t in target_modules:
        if not any(n == t or n.endswith("." + t) for n in names):
            return (f"module {short_repr(t)} is not in the base model (its modules include "
                    f"{', '.join(leaves[:8])}{', ...' if len(leaves) > 8 else ''})")
    return None


def check_lora(model, recipe, kind: str) -> None:
    """The recipe's LoRA for ``kind`` fits the loaded ``model`` before peft builds it: every
    target module exists, and ``r`` is at most min(in, out) of some module it adapts (a larger
    rank adds nothing and, at 1e9, asks for hundreds of GB)."""
    from .recipe_files import display_path

    lo = recipe.section(kind).lora
    where = display_path(recipe.source_file) if recipe.source_file else "recipe"
    problem = target_problem(model, lo.target_modules)
    if problem:
        raise RecipeError(f"{where}: key '{kind}.lora.target_modules': {problem}")
    dims = [min(m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)
            and (lo.target_modules == "all-linear" or isinstance(lo.target_modules, str)
                 or any(name == t or name.endswith("." + t) for t in lo.target_modules))]
    if dims and lo.r > max(dims):
        raise RecipeError(f"{where}: key '{kind}.lora.r': {lo.r} is larger than the modules it adapts "
                          f"(at most {max(dims)} for this model)")


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
