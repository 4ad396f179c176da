"""Checks of an adapter (and its tokenizer and context) against the base model it is loaded onto,
before peft allocates anything: one-line BundleErrors naming the file and field instead of a
size-mismatch traceback or an allocation of hundreds of GB."""
from __future__ import annotations

from pathlib import Path

from mood_data.errors import BundleError
from mood_data.readers import read_json, short_repr
from train.modeling import target_problem

from .checks import check_int, fail


def check_adapter(folder: Path) -> None:
    """A readable adapter: ``adapter_config.json`` a JSON object, the safetensors header sane."""
    read_json(folder / "adapter_config.json", BundleError)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise BundleError(f"{weights}: file not found")
    if weights.stat().st_size == 0:
        raise BundleError(f"{weights}: empty file (not a safetensors adapter)")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="np") as fh:
            list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for a broken header
        text = " ".join(str(exc).split())[:160]
        raise BundleError(f"{weights}: not a valid safetensors file ({text or type(exc).__name__})") from None


def check_adapter_fits(model, adapter: Path, base: str) -> None:
    """Before peft builds anything: the adapter's ``target_modules`` exist in ``model`` (the base
    it is about to be loaded onto), every stored LoRA matrix has the shape of the base module it
    adapts (``--base`` of a different size is named here, not as a size-mismatch traceback), and
    ``r`` is no larger than the ranks stored in the weights (peft allocates ``r`` per module
    before loading: an ``r`` of 1e9 would ask for hundreds of GB)."""
    from safetensors import safe_open

    cpath, wpath = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel: its module paths
    cfg = read_json(cpath, BundleError)
    problem = target_problem(model, cfg.get("target_modules"))
    if problem:
        fail(cpath, "target_modules", problem)
    r = check_int(cpath, "r", cfg.get("r"), 1)
    ranks = []
    with safe_open(str(wpath), framework="np") as fh:
        for key in fh.keys():
            if not key.endswith((".lora_A.weight", ".lora_B.weight")):
                continue
            shape = fh.get_slice(key).get_shape()
            path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise BundleError(f"{wpath}: tensor '{key}': module '{path}' is not in the base model {base} "
                                  "(an adapter for another architecture?)") from None
            want_in, want_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if want_in is None or want_out is None or len(shape) != 2:
                continue
            is_a = key.endswith(".lora_A.weight")
            have = shape[1] if is_a else shape[0]
            want = want_in if is_a else want_out
            if have != want:
                raise BundleError(f"{wpath}: tensor '{key}' has shape {list(shape)} but module '{path}' of the base "
                                  f"model {base} has {'in' if is_a else 'out'}_features {want} (an adapter trained "
                                  "on a base of another size? check --base)")
            ranks.append(shape[0] if is_a else shape[1])
    pattern = cfg.get("rank_pattern") or {}
    biggest = max(ranks, default=0)
    for field, value in [("r", r), *((f"rank_pattern.{k}", v) for k, v in pattern.items())]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (ranks and value > biggest):
            fail(cpath, field, f"{short_repr(value)} does not match the LoRA ranks stored in "
                                f"{wpath.name} (at most {biggest}): refused before allocating")


def check_vocab(tokenizer_dir: Path, tokenizer, model, base: str) -> None:
    """Every token id the tokenizer can produce indexes a row of the base model's input
    embeddings (an id beyond them would be an index error mid-scoring)."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "base_layer", emb).num_embeddings  # a LoRA on the embedding table wraps it
    ids = list(tokenizer.get_vocab().values())
    top = max(ids, default=-1)
    if top >= rows:
        fail(tokenizer_dir, "vocab", f"token id {top} is beyond the {rows} embedding rows of the base model "
                                      f"{base} (a tokenizer of another model? check --base)")


def check_context(path: Path, field: str, max_length: int, model, base: str) -> None:
    """``max_length`` no longer than the base model's context (``max_position_embeddings``,
    when its config declares one): a longer window only costs memory the model cannot use."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and max_length > limit:
        fail(path, field, f"{max_length} exceeds the context of the base model {base} "
                           f"(max_position_embeddings {limit})")


__all__ = ["check_adapter", "check_adapter_fits", "check_context", "check_vocab"]
