"""Where a run's adapters are and loading the backbone ONCE with them (:class:`Loaded`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mood_data.errors import BundleError

from ..engine.forward import SharedBackbone, adapter_hash


def run_root(recipe) -> Path:
    return Path(recipe.output_dir)


def adapter_dirs(recipe) -> tuple[Path, Path | None]:
    """``(<run>/guard, <run>/lm or None)``; a missing guard adapter is a one-line error."""
    root = run_root(recipe)
    guard = root / "guard"
    if not (guard / "adapter_config.json").is_file() and len(recipe.guard.seeds) > 1:
        guard = root / f"guard-seed{recipe.guard.seeds[0]}"  # an ensemble run: the first member anchors
    if not (guard / "adapter_config.json").is_file():
        raise BundleError(f"{guard}: guard adapter not found (train it first: moodguard train guard --recipe ...)")
    lm = root / "lm"
    return guard, (lm if (lm / "adapter_config.json").is_file() else None)


@dataclass
class Loaded:
    backbone: SharedBackbone
    tokenizer: object
    guard_dir: Path
    lm_dir: Path | None
    guard_hash: str
    lm_hash: str | None


def load_backbone(recipe, guard_dir: Path | None = None, lm_dir: Path | None = None,
                  device: str | None = None) -> Loaded:
    """Load the base ONCE with both adapters (see :class:`eval.forward.SharedBackbone`) where
    the device policy puts it (:func:`train.device.placement`: ``device`` = ``--device``)."""
    from train import device as device_policy
    from train.modeling import load_tokenizer, resolve_model

    if guard_dir is None:
        guard_dir, lm_dir = adapter_dirs(recipe)
    base = resolve_model(recipe.model)
    tok_src = recipe.tokenizer or (guard_dir if (Path(guard_dir) / "tokenizer_config.json").is_file() else base)
    tokenizer = load_tokenizer(tok_src, trust_remote_code=recipe.trust_remote_code)
    where = device_policy.placement(recipe.dtype, device, recipe.eval.device_map)
    backbone = SharedBackbone.from_pretrained(base, guard_dir, lm_dir, placement=where,
                                              trust_remote_code=recipe.trust_remote_code)
    return Loaded(backbone, tokenizer, Path(guard_dir), None if lm_dir is None else Path(lm_dir),
                  adapter_hash(guard_dir), None if lm_dir is None else adapter_hash(lm_dir))


__all__ = ["Loaded", "adapter_dirs", "load_backbone", "run_root"]
