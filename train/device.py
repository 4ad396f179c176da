"""The ONE device policy: where and in which dtype a stage runs its model.

Every stage that runs a model (train, fit, evaluate, export, score, judge) asks
:func:`placement` and loads with ``**placement.load_kwargs()``:

* device: ``accelerate.PartialState().device`` unless the command line says otherwise
  (``--device cpu|cuda|cuda:N``): ``cuda:<LOCAL_RANK>`` under ``accelerate launch`` on GPUs,
  ``cuda:0`` in a plain GPU process, ``cpu`` without CUDA or with ``ACCELERATE_USE_CPU=1``.
  Resolving it also sets up the process group of a launched run (gloo on CPU, NCCL on GPUs);
* dtype: the recipe's, as written; ``auto`` = bfloat16 on CUDA (float16 where bf16 is not
  supported), float32 on CPU;
* ``device_map="auto"`` (recipe key ``eval.device_map: auto``) spreads a model that does not
  fit one GPU over every visible GPU; one process owns them all, so it is refused under a
  multi-process launch.

torch and accelerate are imported lazily (the data CLI never pays for them).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from mood_data.errors import RecipeError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_MAPS = (None, "auto")
_CUDA_N = re.compile(r"cuda:(\d+)")


def on_cpu() -> bool:
    """True without CUDA or when ``ACCELERATE_USE_CPU`` asks for the CPU (gloo ranks)."""
    import torch

    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def _state(cpu: bool):
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def parse_device(requested: str | None, cuda_count: int) -> tuple[str, int | None]:
    """THE parser of a ``--device`` value, for every command (train included): ``(kind, index)``
    with kind ``auto``, ``cpu`` or ``cuda`` (index set only for ``cuda:N``). Pure: the caller
    passes how many CUDA devices it sees. A bad or absent device is a one-line RecipeError."""
    req = "auto" if requested is None else str(requested).strip().lower()
    if req in ("auto", "cpu"):
        return req, None
    match = _CUDA_N.fullmatch(req)
    if req != "cuda" and match is None:
        raise RecipeError(f"device {requested!r}: expected {DEVICE_CHOICES}")
    if cuda_count == 0:
        raise RecipeError(f"device {requested!r}: no CUDA device is visible here (use --device cpu)")
    if match is None:
        return "cuda", None
    index = int(match.group(1))
    if index >= cuda_count:
        raise RecipeError(f"device {requested!r}: only {cuda_count} CUDA device(s) visible (expected cuda:N with N < {cuda_count})")
    return "cuda", index


def resolve_device(requested: str | None = None):
    """The ``torch.device`` a stage runs on (see the module doc); a bad value is a one-line
    :class:`RecipeError` (:func:`parse_device`)."""
    import torch

    kind, index = parse_device(requested, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if kind == "cpu":
        _state(True)  # a launched CPU run still gets its gloo ranks
        return torch.device("cpu")
    if kind == "auto":
        return torch.device(_state(on_cpu()).device)
    if index is None:
        return torch.device(_state(False).device)
    _state(False)
    torch.cuda.set_device(index)
    return torch.device(f"cuda:{index}")


def resolve_dtype(name: str | Any, device) -> Any:
    """The recipe's dtype as a ``torch.dtype``; ``auto`` = bf16 (fp16) on CUDA, fp32 on CPU."""
    import torch

    if not isinstance(name, str):
        return name
    if name == "auto":
        if getattr(device, "type", str(device)) == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in table:
        raise RecipeError(f"dtype {name!r}: expected bfloat16, float16, float32 or auto")
    return table[name]


@dataclass(frozen=True)
class Placement:
    """Where a model lives and in which dtype; :meth:`load_kwargs` goes to ``from_pretrained``."""

    device: Any  # torch.device: inputs go here (the first shard's device under device_map=auto)
    dtype: Any  # torch.dtype
    device_map: str | dict | None = None

    def load_kwargs(self) -> dict:
        """``dtype`` + ``device_map`` (``{"": device}`` loads straight onto the one device)."""
        return {"dtype": self.dtype, "device_map": self.device_map or {"": str(self.device)}}

    @property
    def sharded(self) -> bool:
        return self.device_map == "auto"


def placement(dtype: str | Any, requested: str | None = None, device_map: str | None = None) -> Placement:
    """The placement of a stage's model: :func:`resolve_device` + :func:`resolve_dtype`;
    ``device_map='auto'`` spreads the model over every visible GPU (one process only)."""
    if device_map not in DEVICE_MAPS:
        raise RecipeError(f"device_map {device_map!r}: expected null or 'auto'")
    device = resolve_device(requested)
    if device_map == "auto":
        import torch

        state = _state(device.type == "cpu")
        if state.num_processes > 1:
            raise RecipeError("eval.device_map 'auto': one process spreads the model over all GPUs; "
                              "do not combine it with --num-processes / accelerate launch")
        if device.type == "cuda":
            device = torch.device("cuda:0")
    return Placement(device, resolve_dtype(dtype, device), device_map)


__all__ = ["DEVICE_CHOICES", "Placement", "on_cpu", "parse_device", "placement", "resolve_device", "resolve_dtype"]
