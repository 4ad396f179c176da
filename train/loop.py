"""The one training loop behind ``train.guard``, ``train.lm`` and ``train.judge``.

``train_adapter`` builds TrainingArguments from a recipe section (global batch fixed,
accumulation derived from the world size), a Trainer with a seeded length-grouped sampler,
trains one adapter per seed (checkpoints every ``save_steps``; ``resume`` continues from the
last one) and writes the final adapter folder atomically on the main process. Process
launching (accelerate re-exec, parallel members) is :mod:`train.launch`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mood_data.errors import RecipeError

from .recipe import Recipe, TrainSection, gradient_accumulation_steps


@dataclass
class AdapterJob:
    """What differs between the guard and the causal LM."""

    kind: str                                     # "guard" | "lm"
    build_model: Callable[[Recipe, Any], Any]     # (recipe, tokenizer) -> peft model
    build_datasets: Callable[[Recipe, Any], Any]  # (recipe, tokenizer) -> DatasetDict(train, validation)
    collator: Callable[[Recipe, Any], Any]        # (recipe, tokenizer) -> data collator
    compute_metrics: Callable | None = None
    preprocess_logits: Callable | None = None
    # True when the model's loss is a per-example mean that ignores num_items_in_batch
    # (sequence classification): Trainer must then not rescale it by the world size.
    mean_loss: bool = False


def adapter_dirname(kind: str, seeds: Sequence[int], seed: int) -> str:
    """``guard`` for a single seed; ``guard-seed<S>`` siblings for a seed list."""
    return kind if len(seeds) == 1 else f"{kind}-seed{seed}"


def on_cpu() -> bool:
    import torch

    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def make_trainer_class():
    from transformers import Trainer

    from .data import SeededLengthGroupedSampler, split_micro_batch

    class MoodTrainer(Trainer):
        """Trainer whose train sampler is seeded and grouped by *global* batch, so data order is
        the same for every process count and after a resume."""

        def __init__(self, *args, lengths: Sequence[int], group_size: int, group_by_length: bool,
                     mean_loss: bool = False, mega_batch_mult: int | None = None,
                     max_tokens_per_forward: int | None = None, pad_to_multiple_of: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            # a per-row-mean loss (the guard) lets a too-wide micro-batch run as row chunks
            self._max_tokens = max_tokens_per_forward if mean_loss else None
            self._pad_multiple = pad_to_multiple_of
            self._loss_scale = 1.0
            if mean_loss:
                # transformers' sequence-classification loss ignores num_items_in_batch although
                # forward() takes **kwargs; without this the DDP loss is multiplied by the world size
                self.model_accepts_loss_kwargs = False
            self._mood_sampler = SeededLengthGroupedSampler(lengths, group_size, self.args.seed, group_by_length,
                                                            mega_batch_mult)

        def _get_train_sampler(self, train_dataset=None):
            return self._mood_sampler

        def training_step(self, model, inputs, num_items_in_batch=None):
            """A micro-batch over ``max_tokens_per_forward`` positions runs as row chunks (each
            trimmed to its own width), their mean losses weighted by row share: the gradient is
            the whole micro-batch's, the activation memory a chunk's."""
            chunks = split_micro_batch(inputs, self._max_tokens, self._pad_multiple) if self._max_tokens else [inputs]
            if len(chunks) == 1:
                return super().training_step(model, inputs, num_items_in_batch)
            rows, total = inputs["input_ids"].shape[0], 0.0
            try:
                for chunk in chunks:
                    self._loss_scale = chunk["input_ids"].shape[0] / rows
                    total = total + super().training_step(model, chunk, num_items_in_batch)
            finally:
                self._loss_scale = 1.0
            return total

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if self._loss_scale == 1.0:
                return out
            return (out[0] * self._loss_scale, out[1]) if return_outputs else out * self._loss_scale

    return MoodTrainer


def training_arguments(recipe: Recipe, sec: TrainSection, kind: str, seed: int, ckpt_dir: Path, run_name: str):
    from accelerate import PartialState
    from transformers import TrainingArguments

    from .distributed import accelerate_placement, check_engine_available, enter_cpu_engine

    cpu = on_cpu()
    enter_cpu_engine(cpu)
    place = accelerate_placement(cpu, int(os.environ.get("WORLD_SIZE", "1") or 1))  # WORLD_SIZE: set by the launcher
    state = PartialState(cpu=place.cpu, **({"backend": place.backend} if place.backend else {}))
    check_engine_available(state.distributed_type)
    world = state.num_processes
    accum = gradient_accumulation_steps(
        sec.global_batch_size, sec.per_device_batch_size, world, where=f"{recipe.source_file}: key '{kind}.global_batch_size'"
    )
    from mood_data.console import show_progress

    return TrainingArguments(
        output_dir=str(ckpt_dir),
        run_name=run_name,
        seed=seed,
        data_seed=seed,
        per_device_train_batch_size=sec.per_device_batch_size,
        per_device_eval_batch_size=sec.per_device_batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=sec.learning_rate,
        num_train_epochs=sec.num_epochs,
        max_steps=sec.max_steps,
        # transformers 5: warmup_ratio is deprecated; warmup_steps takes a float in [0, 1) as a
        # ratio of the total steps (recipe validation keeps warmup_ratio in [0, 1))
        warmup_steps=float(sec.warmup_ratio),
        lr_scheduler_type=sec.lr_scheduler,
        weight_decay=sec.weight_decay,
        max_grad_norm=sec.max_grad_norm,
        optim=sec.optim,
        logging_steps=sec.logging_steps,
        save_strategy="steps",
        save_steps=sec.save_steps,
        save_total_limit=sec.save_total_limit,
        eval_strategy="steps" if sec.eval_steps else "no",
        eval_steps=sec.eval_steps,
        activation_checkpointing=sec.gradient_checkpointing,  # the new name: no FutureWarning
        activation_checkpointing_kwargs={"use_reentrant": False} if sec.gradient_checkpointing else None,
        disable_tqdm=not show_progress(),  # a bar on a terminal, plain log lines in a log file
        report_to=[] if recipe.report_to == "none" else [recipe.report_to],
        bf16=(recipe.dtype == "bfloat16" and not cpu),
        use_cpu=place.cpu,
        ddp_backend=place.backend,
        ddp_find_unused_parameters=False,
        label_names=["labels"],
        dataloader_num_workers=0,
    )


def _write_run_files(out: Path, recipe: Recipe, metrics: dict) -> None:
    from mood_data.atomic import write_json, write_text

    from .modeling import save_versions

    write_text(out / "recipe.yaml", recipe.to_yaml())
    write_json(out / "metrics.json", metrics)
    write_json(out / "versions.json", save_versions())


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set to a true value: no network to use."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def train_adapter(recipe: Recipe, job: AdapterJob, resume: bool = False,
                  only_seeds: Sequence[int] | None = None) -> list[Path]:
    """Train one adapter per seed of ``recipe.<kind>`` (or only the members ``only_seeds``,
    named as in the full list); returns the final adapter folders."""
    import torch
    from transformers import set_seed

    from mood_data.atomic import atomic_dir, write_text

    from .checkpoints import resume_point, staging_dir
    from .distributed import TrainingStopped, engine_record, make_stop_callback, save_full_adapter, stop_file
    from .modeling import load_tokenizer

    sec = recipe.section(job.kind)
    if not sec.enabled:
        raise RecipeError(f"{recipe.source_file}: key '{job.kind}.enabled': the {job.kind} is disabled in this recipe")
    for s in only_seeds or ():
        if s not in sec.seeds:
            raise RecipeError(f"{recipe.source_file}: key '{job.kind}.seeds': member seed {s} is not in {sec.seeds}")
    out_root = Path(recipe.output_dir)
    if recipe.report_to == "wandb":
        os.environ.setdefault("WANDB_PROJECT", recipe.wandb_project)
        os.environ.setdefault("WANDB_DIR", str(out_root))
        if "WANDB_MODE" not in os.environ and hub_offline():
            os.environ["WANDB_MODE"] = "offline"  # no network: log locally (wandb sync later), never hang
        out_root.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = load_tokenizer(recipe.tokenizer or recipe.model, recipe.trust_remote_code)
    except OSError as exc:  # an uncached hub id offline, a folder without tokenizer files, ...
        key = "tokenizer" if recipe.tokenizer else "model"
        why = ("not a local folder and not in the Hugging Face cache; HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE forbid "
               "downloading it" if hub_offline() else " ".join(str(exc).split())[:200])
        raise RecipeError(f"{recipe.source_file}: key '{key}': {recipe.tokenizer or recipe.model}: cannot be "
                          f"loaded ({why})") from None
    datasets_ = job.build_datasets(recipe, tokenizer)
    trainer_cls = make_trainer_class()
    finals: list[Path] = []
    for seed in (sec.seeds if only_seeds is None else [s for s in sec.seeds if s in only_seeds]):
        name = adapter_dirname(job.kind, sec.seeds, seed)
        ckpt_dir = out_root / "checkpoints" / name
        args = training_arguments(recipe, sec, job.kind, seed, ckpt_dir, f"{recipe.name}-{name}")
        set_seed(seed)
        model = job.build_model(recipe, tokenizer)
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=datasets_["train"],
            eval_dataset=datasets_["validation"],
            data_collator=job.collator(recipe, tokenizer),
            processing_class=tokenizer,
            compute_metrics=job.compute_metrics,
            preprocess_logits_for_metrics=job.preprocess_logits,
            lengths=datasets_["train"]["length"],
            group_size=sec.global_batch_size,
            group_by_length=sec.group_by_length,
            mean_loss=job.mean_loss,
        )
        stop_path = stop_file()
        stopper = make_stop_callback(stop_path, trainer.accelerator) if stop_path else None
        if stopper is not None:
            trainer.add_callback(stopper)
        last = resume_point(recipe, job.kind, ckpt_dir, resume, main_process=trainer.is_world_process_zero())
        trainer.accelerator.wait_for_everyone()
        train_out = trainer.train(resume_from_checkpoint=last)
        if stopper is not None and stopper.stopped:
            trainer.accelerator.wait_for_everyone()
            raise TrainingStopped(str(ckpt_dir / f"checkpoint-{trainer.state.global_step}"))
        val = trainer.evaluate()
        staging = staging_dir(out_root, name, trainer.accelerator)
        save_full_adapter(trainer, staging)
        trainer.accelerator.wait_for_everyone()
        final = out_root / name
        if trainer.is_world_process_zero():
            if not (staging / "adapter_model.safetensors").is_file():
                raise RuntimeError(f"{staging}: no adapter_model.safetensors after saving the {job.kind} adapter "
                                   f"(engine {engine_record(trainer.accelerator)}); nothing written to {final}")
            metrics = {
                "kind": job.kind,
                "seed": seed,
                "train": dict(train_out.metrics),
                "validation": dict(val),
                "n_train": len(datasets_["train"]),
                "n_validation": len(datasets_["validation"]),
                "num_processes": args.world_size,
                "global_batch_size": sec.global_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "resumed_from": last,
                "engine": engine_record(trainer.accelerator),
                # where the model actually trained (--device / accelerate), and its parameter dtype
                "device": str(trainer.args.device),
                "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
            }
            try:
                with atomic_dir(final) as tmp:
                    for f in staging.iterdir():
                        if f.is_file() and f.suffix != ".bin":  # skip Trainer's pickled training_args.bin
                            shutil.copy2(f, tmp / f.name)
                    _write_run_files(tmp, recipe, metrics)
                    from .card import write_card

                    write_card(tmp, job.kind, name=f"{recipe.name}-{name}")  # replaces peft's empty card
            finally:  # also when the copy fails (disk full): no staging folder left behind
                shutil.rmtree(staging, ignore_errors=True)
            write_text(out_root / "recipe.yaml", recipe.to_yaml())
        trainer.accelerator.wait_for_everyone()
        if recipe.report_to == "wandb" and trainer.is_world_process_zero():
            import wandb

            wandb.finish()
        finals.append(final)
        del trainer, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return finals


def end_distributed(ok: bool = True) -> None:
    """Tear down the process group at the end of a launched run. After a failure (``ok=False``)
    there is no barrier: the other ranks may be inside another collective, and a barrier there
    deadlocks the job instead of letting the launcher stop it (the fsdp "hang" of issue 16)."""
    import torch.distributed as dist

    if ok and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
