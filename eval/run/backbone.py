"""Where a run's adapters are and loading the backbone ONCE with them (:class:`Loaded`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mood_data.errors import BundleError

from ..engine.forward import SharedBackbone, adapter_hash
from .context import ModelSpec


def adapter_dirs(model: ModelSpec) -> tuple[Path, Path | None]:
    """``(<run>/guard, <run>/lm or None)``; a missing guard adapter is a one-line error."""
    root = model.run_root
    guard = root / "guard"
    if not (guard / "adapter_config.json").is_file() and len(model.guard_seeds) > 1:
        guard = root / f"guard-seed{model.guard_seeds[0]}"  # an ensemble run: the first member anchors
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


def load_backbone(model: ModelSpec, guard_dir: Path, lm_dir: Path | None) -> Loaded:
    """Load the base ONCE with both adapters (see :class:`eval.engine.forward.SharedBackbone`)
    where the device policy puts it (``model.device`` = ``--device``)."""
    from train import device as device_policy
    from train.modeling import load_tokenizer, resolve_model

    base = resolve_model(model.base)
    tok_src = model.tokenizer or (guard_dir if (Path(guard_dir) / "tokenizer_config.json").is_file() else base)
    tokenizer = load_tokenizer(tok_src, trust_remote_code=model.trust_remote_code)
    where = device_policy.placement(model.dtype, model.device, model.device_map)
    backbone = SharedBackbone.from_pretrained(base, guard_dir, lm_dir, placement=where,
                                              trust_remote_code=model.trust_remote_code)
    return Loaded(backbone, tokenizer, Path(guard_dir), None if lm_dir is None else Path(lm_dir),
                  adapter_hash(guard_dir), None if lm_dir is None else adapter_hash(lm_dir))


def load_run(model: ModelSpec) -> Loaded:
    """The run's backbone: :func:`load_backbone` with the adapters :func:`adapter_dirs` finds."""
    return load_backbone(model, *adapter_dirs(model))


__all__ = ["Loaded", "adapter_dirs", "load_backbone", "load_run"]
