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

from .recipe_checks import gradient_accumulation_steps
from .recipe_schema import Recipe, TrainSection


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
    # model selection (<kind>.eval_every): the validation metric (without "eval_") and its direction
    best_metric: str = "loss"
    greater_is_better: bool = False
    # called once before training with (recipe, trainer, datasets); may change the model (the
    # guard's LP-FT head) and returns a record for metrics.json["init_head"] (or None)
    init_model: Callable[[Recipe, Any, Any], dict | None] | None = None


def adapter_dirname(kind: str, seeds: Sequence[int], seed: int) -> str:
    """``guard`` for a single seed; ``guard-seed<S>`` siblings for a seed list."""
    return kind if len(seeds) == 1 else f"{kind}-seed{seed}"


def on_cpu() -> bool:
    import torch

    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


HEAD_MARK = ".modules_to_save."  # peft's trainable copy of the classification head (score / classifier)


def is_head_parameter(name: str) -> bool:
    """A parameter of the trainable classification head (peft ``modules_to_save`` copy), by name:
    the name survives DDP / DeepSpeed / FSDP2 wrapping (prefixes only)."""
    return HEAD_MARK in name


def optimizer_groups(named_parameters, decay_names, weight_decay: float, head_learning_rate: float | None) -> list[dict]:
    """Trainer's two parameter groups (weight decay except biases / norms: ``decay_names``), each
    split into body and head when the head has its own learning rate (the head groups carry
    ``lr``; empty groups are dropped). Body groups come first: the logged learning rate (group 0)
    stays the LoRA one."""
    decay_names = set(decay_names)
    cells: dict[tuple[bool, bool], list] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, p in named_parameters:
        if p.requires_grad:
            head = head_learning_rate is not None and is_head_parameter(name)
            cells[(head, name in decay_names)].append(p)
    groups = []
    for (head, decay), params in cells.items():
        if params:
            group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            if head:
                group["lr"] = head_learning_rate
            groups.append(group)
    return groups


def class_weight_vector(spec, labels: Sequence[int]) -> list[float] | None:
    """Per-class loss weights ``[w_safe, w_unsafe]`` for ``<kind>.class_weights`` over the train
    labels: "balanced" = n / (2 n_c); a given pair is rescaled so that the mean weight over the train
    rows is 1 (balanced already is): only the ratio matters and the loss keeps the scale of plain
    cross-entropy. None = unweighted."""
    import numpy as np

    from mood_data.errors import DataError

    if spec is None:
        return None
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=2).astype(np.float64)
    if spec == "balanced":
        if (counts == 0).any():
            raise DataError(f"train rows: class_weights 'balanced' needs both classes; counts safe/unsafe {counts.astype(int).tolist()}")
        w = len(y) / (2.0 * counts)
    else:
        w = np.asarray(spec, dtype=np.float64)
    return (w / (float(w @ counts) / len(y))).tolist()


def weighted_cross_entropy(logits, labels, weights):
    """mean_i w[y_i] * CE(logits_i, y_i): normalised by the number of rows (not by the sum of the
    weights, as torch's ``weight=`` does), so the loss stays a per-row mean: row chunks,
    gradient accumulation and DDP average it exactly like the unweighted loss."""
    import torch.nn.functional as F

    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_row * weights.to(per_row.device)[labels]).mean()


def make_trainer_class():
    from transformers import Trainer

    from .data import SeededLengthGroupedSampler, split_micro_batch

    class MoodTrainer(Trainer):
        """Trainer whose train sampler is seeded and grouped by *global* batch, so data order is
        the same for every process count and after a resume. Optional: the classification head in
        its own optimizer group (``head_learning_rate``), class-weighted cross-entropy
        (``class_weights``: ``[w_safe, w_unsafe]``)."""

        def __init__(self, *args, lengths: Sequence[int], group_size: int, group_by_length: bool,
                     mean_loss: bool = False, mega_batch_mult: int | None = None,
                     max_tokens_per_forward: int | None = None, pad_to_multiple_of: int | None = None,
                     head_learning_rate: float | None = None, class_weights: Sequence[float] | None = None, **kwargs):
            import torch

            super().__init__(*args, **kwargs)
            # a per-row-mean loss (the guard) lets a too-wide micro-batch run as row chunks
            self._max_tokens = max_tokens_per_forward if mean_loss else None
            self._pad_multiple = pad_to_multiple_of
            self._loss_scale = 1.0
            self._head_lr = head_learning_rate
            self._class_weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
            if mean_loss:
                # transformers' sequence-classification loss ignores num_items_in_batch although
                # forward() takes **kwargs; without this the DDP loss is multiplied by the world size
                self.model_accepts_loss_kwargs = False
            self._mood_sampler = SeededLengthGroupedSampler(lengths, group_size, self.args.seed, group_by_length,
                                                            mega_batch_mult)

        def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler=False):
            """Trainer's evaluation; the one before step 1 (``eval_on_start`` under model selection)
            also makes the starting weights a candidate: compared like any later evaluation and
            saved as ``checkpoint-0``. Trainer's own bookkeeping reads best step 0 as "none", so the
            best checkpoint's path is set here, before the save (the checkpoint's trainer_state
            carries it, and the rotation keeps the folder while it is the best)."""
            metrics = super()._evaluate(trial, ignore_keys_for_eval, skip_scheduler=skip_scheduler)
            if self.state.global_step == 0 and self.args.load_best_model_at_end:
                self._determine_best_metric(metrics=metrics, trial=trial)  # the first: always the best so far
                self.state.best_model_checkpoint = os.path.join(self._get_output_dir(trial=trial), "checkpoint-0")
                self._save_checkpoint(self.model, trial)
            return metrics

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

        def create_optimizer(self, model=None):
            """Trainer's optimizer, with the head's parameters in groups of their own at
            ``head_learning_rate`` (same weight-decay rule). Trainer calls this on every engine
            path (plain / DDP, DeepSpeed without an optimizer block in its config, FSDP2 after
            wrapping); the scheduler scales each group's own initial lr."""
            if self._head_lr is None or self.optimizer is not None:
                return super().create_optimizer(model)
            from transformers.trainer import is_optimizer_factory

            opt_model = self.model if model is None else model
            groups = optimizer_groups(opt_model.named_parameters(), self.get_decay_parameter_names(opt_model),
                                      self.args.weight_decay, self._head_lr)
            cls, kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if is_optimizer_factory(cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
                raise RecipeError(f"key 'guard.head_learning_rate': optimizer {self.args.optim!r} builds its own "
                                  "parameter groups; use an optimizer such as adamw_torch, or head_learning_rate: null")
            self.optimizer = cls(groups, **kwargs)
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self._class_weights is not None and "labels" in inputs:
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
                loss = weighted_cross_entropy(outputs["logits"], inputs["labels"], self._class_weights)
                out = (loss, outputs) if return_outputs else loss
            else:
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            if self._loss_scale == 1.0:
                return out
            return (out[0] * self._loss_scale, out[1]) if return_outputs else out * self._loss_scale

    return MoodTrainer


def evaluation_arguments(sec: TrainSection, best_metric: str = "loss", greater_is_better: bool = False) -> dict:
    """TrainingArguments for evaluation, checkpoints and model selection. ``eval_every``: evaluate
    and checkpoint at the same cadence (every epoch or every N steps; Trainer also evaluates and
    saves the final step) and load the best checkpoint at the end (``metric_for_best_model``);
    otherwise checkpoints every ``save_steps`` and plain evaluation every ``eval_steps``.
    ``eval_on_start`` adds the starting weights as a candidate (``MoodTrainer._evaluate``)."""
    if sec.eval_every is None:
        return {"save_strategy": "steps", "save_steps": sec.save_steps,
                "eval_strategy": "steps" if sec.eval_steps else "no", "eval_steps": sec.eval_steps}
    strategy = "epoch" if sec.eval_every == "epoch" else "steps"
    out = {"save_strategy": strategy, "eval_strategy": strategy, "load_best_model_at_end": True,
           "metric_for_best_model": best_metric, "greater_is_better": greater_is_better,
           "eval_on_start": sec.eval_on_start}
    if strategy == "steps":
        out.update(save_steps=sec.eval_every, eval_steps=sec.eval_every)
    return out


def training_arguments(recipe: Recipe, sec: TrainSection, kind: str, seed: int, ckpt_dir: Path, run_name: str,
                       selection: tuple[str, bool] = ("loss", False)):
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
        save_total_limit=sec.save_total_limit,
        **evaluation_arguments(sec, *selection),
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


def steps_per_epoch(batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps in one epoch, as Trainer counts them (a last partial accumulation counts)."""
    return max(batches_per_epoch // accumulation + int(batches_per_epoch % accumulation > 0), 1)


def make_schedule_callback(kind: str, n_train: int, global_batch: int):
    """A ``TrainerCallback`` that records (``.record``) and logs, on the main process, how many
    optimizer steps an epoch has and how many epochs the run's steps are."""
    import sys

    from transformers import TrainerCallback

    class Schedule(TrainerCallback):
        def __init__(self):
            self.record: dict = {}

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            if train_dataloader is None:
                return
            per_epoch = steps_per_epoch(len(train_dataloader), args.gradient_accumulation_steps)
            self.record = {"steps_per_epoch": per_epoch, "max_steps": state.max_steps,
                           "epochs": round(state.max_steps / per_epoch, 4)}
            if state.is_world_process_zero:
                print(f"moodguard: {kind}: {n_train} train rows, global batch {global_batch}: {per_epoch} steps per "
                      f"epoch; {state.max_steps} steps = {self.record['epochs']:g} epochs", file=sys.stderr, flush=True)

    return Schedule()


def selection_record(state, metric: str, greater_is_better: bool) -> dict:
    """What model selection saw (metrics.json["selection"]): every evaluation's metric by step, and
    the best step, its value and checkpoint (the final adapter's weights)."""
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    evaluations = [{"step": e["step"], key: e[key]} for e in state.log_history if key in e]
    return {"metric": key, "greater_is_better": greater_is_better, "best_step": state.best_global_step,
            "best_value": state.best_metric,
            "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
            "last_step": state.global_step, "evaluations": evaluations}


def _write_run_files(out: Path, recipe: Recipe, metrics: dict) -> None:
    from mood_data.atomic import write_json, write_text

    from .modeling import save_versions

    write_text(out / "recipe.yaml", recipe.to_yaml())
    write_json(out / "metrics.json", metrics)
    write_json(out / "versions.json", save_versions())


def finite_or_null(metrics: dict, kind: str) -> dict:
    """Validation metrics for metrics.json: a value that is not a finite number (the AUROC of a
    validation slice holding one class, e.g. a refresh on unsafe rows only) is recorded as null,
    with one warning line, instead of failing the write after the whole training."""
    import math
    import sys

    out = {}
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            print(f"moodguard: warning: {kind}: validation {k} is {v} (a validation slice with one class?): "
                  "recorded as null", file=sys.stderr)
            v = None
        out[k] = v
    return out


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
    weights = class_weight_vector(sec.class_weights, datasets_["train"]["labels"]) if sec.class_weights else None
    trainer_cls = make_trainer_class()
    finals: list[Path] = []
    for seed in (sec.seeds if only_seeds is None else [s for s in sec.seeds if s in only_seeds]):
        name = adapter_dirname(job.kind, sec.seeds, seed)
        ckpt_dir = out_root / "checkpoints" / name
        args = training_arguments(recipe, sec, job.kind, seed, ckpt_dir, f"{recipe.name}-{name}",
                                  selection=(job.best_metric, job.greater_is_better))
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
            head_learning_rate=sec.head_learning_rate,
            class_weights=weights,
        )
        schedule = make_schedule_callback(job.kind, len(datasets_["train"]), sec.global_batch_size)
        trainer.add_callback(schedule)
        stop_path = stop_file()
        stopper = make_stop_callback(stop_path, trainer.accelerator) if stop_path else None
        if stopper is not None:
            trainer.add_callback(stopper)
        last = resume_point(recipe, job.kind, ckpt_dir, resume, main_process=trainer.is_world_process_zero())
        trainer.accelerator.wait_for_everyone()
        # e.g. the guard's LP-FT head; also on a resume (deterministic; the checkpoint's head then wins)
        init_record = job.init_model(recipe, trainer, datasets_) if job.init_model is not None else None
        # a resumed run evaluated its starting weights before the interruption (its checkpoint's
        # trainer_state holds that evaluation); evaluating the resume point again would log it twice
        trainer.args.eval_on_start = bool(args.eval_on_start) and last is None
        train_out = trainer.train(resume_from_checkpoint=last)
        if stopper is not None and stopper.stopped:
            trainer.accelerator.wait_for_everyone()
            raise TrainingStopped(str(ckpt_dir / f"checkpoint-{trainer.state.global_step}"))
        selection = (selection_record(trainer.state, job.best_metric, job.greater_is_better)
                     if sec.eval_every is not None else None)
        val = trainer.evaluate()  # after load_best_model_at_end: the selected checkpoint's weights
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
                "validation": finite_or_null(dict(val), job.kind),
                "n_train": len(datasets_["train"]),
                "n_validation": len(datasets_["validation"]),
                "num_processes": args.world_size,
                "global_batch_size": sec.global_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                **schedule.record,  # steps_per_epoch, max_steps, epochs
                "selection": selection,
                "init_head": init_record,
                "class_weights": weights,
                "head_learning_rate": sec.head_learning_rate,
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
