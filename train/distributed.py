"""What the distributed launch asks of the training loop (DeepSpeed ZeRO-2/3, FSDP, DDP).

Small pure functions over the environment ``accelerate launch`` sets for its ranks
(``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``, ``FSDP_*``) and over the live
accelerate / DeepSpeed state; the training loop (``train.launch``) and the model builders
(``train.guard``, ``train.lm``; the judge builds through ``train.lm``) call them.

- ``launched_engine()``: "deepspeed" | "fsdp" | "ddp" | "none".
- ``zero3_active()``: ZeRO-3 decided from the DeepSpeed config transformers holds
  (``HfDeepSpeedConfig``, set by ``TrainingArguments`` under a DeepSpeed launch), else from
  accelerate's DeepSpeed plugin. ``peft_model_kwargs()`` then adds
  ``autocast_adapter_dtype=False`` to ``get_peft_model`` (DeepSpeed issue 8072: with the adapter
  autocast to float32 on a bf16 base, ZeRO-3 fails at the first optimizer step; TRL does the same).
- ``accelerate_placement(cpu)``: how to start accelerate on a CPU-only machine. accelerate
  1.15 never enters DeepSpeed mode when ``cpu=True`` / ``ACCELERATE_USE_CPU=1`` (it then wraps
  the ZeRO-3-partitioned model in plain DDP: "'weight' must be 2-D" at the first forward), so a
  DeepSpeed rank on CPU starts accelerate with ``cpu=False`` and the gloo backend instead (its
  device is then the CPU, DeepSpeed's CPU accelerator does the rest).
- ``check_engine_available(distributed_type)``: FSDP on a CPU-only machine is refused with one line: accelerate
  1.15 turns FSDP on only for accelerator distributed types (MULTI_GPU, ...), so on CPU the
  ``fsdp`` config would silently train as DDP (and ``fsdp_cpu_ram_efficient_loading`` leaves the
  weights of ranks > 0 on the meta device).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Mapping

Engine = Literal["deepspeed", "fsdp", "ddp", "none"]
_TRUE = ("1", "true", "yes", "on")


def _flag(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "").strip().lower() in _TRUE


def launched_engine(env: Mapping[str, str] | None = None) -> Engine:
    """The engine ``accelerate launch`` configured for this rank (from its environment)."""
    env = os.environ if env is None else env
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return "fsdp"
    if int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return "ddp"
    return "none"


def zero3_active() -> bool:
    """ZeRO-3 is on for this process: transformers' DeepSpeed config (which ``TrainingArguments``
    creates under a DeepSpeed launch and ``from_pretrained`` obeys), else accelerate's plugin."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    if is_deepspeed_zero3_enabled():
        return True
    from accelerate.state import AcceleratorState

    if not AcceleratorState._shared_state:
        return False
    plugin = getattr(AcceleratorState(), "deepspeed_plugin", None)
    return bool(plugin is not None and getattr(plugin, "zero_stage", None) == 3)


def peft_model_kwargs() -> dict:
    """Extra keyword arguments of ``peft.get_peft_model`` for the active engine."""
    return {"autocast_adapter_dtype": False} if zero3_active() else {}


@dataclass(frozen=True)
class AcceleratePlacement:
    """How this rank starts accelerate: ``cpu`` for ``PartialState``/``TrainingArguments.use_cpu``,
    ``backend`` for ``ddp_backend`` (``None``: accelerate's choice)."""

    cpu: bool
    backend: str | None


def accelerate_placement(cpu: bool, world: int, engine: Engine | None = None) -> AcceleratePlacement:
    """Pure rule: on CPU, DeepSpeed ranks start accelerate with ``cpu=False`` + gloo (the only way
    accelerate 1.15 selects DeepSpeed without CUDA); other CPU runs with ``cpu=True`` (+ gloo when
    there are several ranks); on GPUs accelerate chooses (NCCL)."""
    engine = launched_engine() if engine is None else engine
    if not cpu:
        return AcceleratePlacement(cpu=False, backend=None)
    if engine in ("deepspeed", "fsdp"):
        return AcceleratePlacement(cpu=False, backend="gloo")
    return AcceleratePlacement(cpu=True, backend="gloo" if world > 1 else None)


def enter_cpu_engine(cpu: bool) -> None:
    """On a CPU-only DeepSpeed/FSDP rank, drop ``ACCELERATE_USE_CPU`` from this process's
    environment (``AcceleratorState`` reads it and would then refuse the engine); ``cpu`` was
    decided before."""
    if cpu and launched_engine() in ("deepspeed", "fsdp"):
        os.environ.pop("ACCELERATE_USE_CPU", None)


def check_engine_available(distributed_type: str, engine: Engine | None = None) -> None:
    """Refuse an FSDP launch that accelerate will not run as FSDP (one line) instead of silently
    training as DDP: accelerate turns FSDP on only for accelerator distributed types
    (MULTI_GPU, MULTI_XPU, ...), never for NO / MULTI_CPU, i.e. never on a CPU-only machine."""
    from mood_data.errors import RecipeError

    engine = launched_engine() if engine is None else engine
    if engine == "fsdp" and str(distributed_type).split(".")[-1] in ("NO", "MULTI_CPU"):
        raise RecipeError(
            "accelerate config with distributed_type FSDP: FSDP needs GPUs (accelerate enables FSDP only on "
            "accelerator devices, so on this CPU-only machine it would train as plain DDP); use "
            "accelerate.config=cpu (DDP over gloo) or zero2/zero3 here"
        )


def engine_record(accelerator) -> dict:
    """What actually ran, for ``metrics.json``: accelerate's distributed type, the ZeRO stage,
    the FSDP version and state-dict type (``None`` where they do not apply)."""
    state = accelerator.state
    ds = getattr(state, "deepspeed_plugin", None)
    fsdp = getattr(state, "fsdp_plugin", None)
    return {
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "zero_stage": getattr(ds, "zero_stage", None) if ds is not None else None,
        "fsdp_version": getattr(fsdp, "fsdp_version", None) if fsdp is not None else None,
        "fsdp_state_dict_type": str(fsdp.state_dict_type).split(".")[-1] if fsdp is not None else None,
    }


def fsdp_needs_gather(accelerator) -> bool:
    """FSDP with a sharded/local state-dict type: ``Trainer.save_model`` then writes no full
    adapter (accelerate issue 3732), so the adapter is gathered explicitly at save."""
    if str(accelerator.distributed_type).split(".")[-1] != "FSDP":
        return False
    return "FULL_STATE_DICT" not in str(accelerator.state.fsdp_plugin.state_dict_type)


def save_full_adapter(trainer, folder) -> None:
    """Write the FULL adapter (LoRA weights + the ``modules_to_save`` score head) and the tokenizer
    to ``folder`` on the main process, whatever the engine. A collective: every rank calls it.

    DDP / ZeRO-2 / ZeRO-3 (``stage3_gather_16bit_weights_on_model_save``) / FSDP with
    ``FULL_STATE_DICT``: ``Trainer.save_model``. FSDP with a sharded state dict: every rank joins
    ``accelerator.get_state_dict`` (a full gather), the main process saves that state dict through
    peft (which keeps the adapter keys)."""
    from pathlib import Path

    folder = Path(folder)
    acc = trainer.accelerator
    if not fsdp_needs_gather(acc):
        trainer.save_model(str(folder))
        return
    state_dict = acc.get_state_dict(trainer.model)
    if trainer.args.should_save:
        folder.mkdir(parents=True, exist_ok=True)
        acc.unwrap_model(trainer.model).save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# checkpoint-and-stop on request (Slurm: the batch script's USR1 trap creates the stop file)

STOP_FILE_ENV = "MOODGUARD_STOP_FILE"
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; rerun with --resume


class TrainingStopped(Exception):
    """Training stopped on request after writing a checkpoint (no final adapter)."""

    def __init__(self, checkpoint: str):
        super().__init__(f"stopped on request after saving {checkpoint}; rerun with --resume to continue")
        self.checkpoint = checkpoint


def stop_file() -> str | None:
    """The file whose appearance asks training to checkpoint and stop (``$MOODGUARD_STOP_FILE``)."""
    return os.environ.get(STOP_FILE_ENV) or None


def make_stop_callback(path: str, accelerator):
    """A ``TrainerCallback``: after every optimizer step the ranks agree (one all-reduce of a flag)
    whether ``path`` exists on any of them; if so Trainer saves a checkpoint and stops. All ranks
    take the same decision at the same step, so the checkpoint save (a collective under ZeRO-3 /
    FSDP) never deadlocks. ``callback.stopped`` tells the loop not to write a final adapter."""
    import torch
    from transformers import TrainerCallback

    class StopOnFile(TrainerCallback):
        stopped = False

        def on_step_end(self, args, state, control, **kwargs):
            flag = torch.tensor([1.0 if os.path.exists(path) else 0.0], device=accelerator.device)
            if float(accelerator.reduce(flag, reduction="sum").item()) > 0:
                control.should_save = True
                control.should_training_stop = True
                self.stopped = True
            return control

    return StopOnFile()


def training_device_environment(requested: str | None, num_processes: int, cuda_count: int) -> dict[str, str]:
    """Environment that makes ``moodguard train --device D`` hold for this process and every rank
    it launches (Trainer and accelerate then place the model: ``cuda:<LOCAL_RANK>`` on GPUs, the
    CPU otherwise). Pure; one-line ``RecipeError`` for a device that is not there.

    ``None``/``auto``: nothing (accelerate's choice: the GPUs when present). ``cpu``:
    ``ACCELERATE_USE_CPU=1``. ``cuda``: the visible GPUs (error without one). ``cuda:N``: only
    GPU N (``CUDA_VISIBLE_DEVICES``), for a one-process run."""
    from mood_data.errors import RecipeError

    from .device import parse_device

    kind, index = parse_device(requested, cuda_count)
    if kind == "cpu":
        return {"ACCELERATE_USE_CPU": "1"}
    if index is None:  # auto, or every visible GPU
        return {}
    if num_processes > 1:
        raise RecipeError(f"device {requested!r}: one GPU for {num_processes} processes; use --device cuda "
                          "(or CUDA_VISIBLE_DEVICES) with a multi-process launch")
    return {"CUDA_VISIBLE_DEVICES": str(index)}
