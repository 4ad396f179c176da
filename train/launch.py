"""Running a training job: in-process with transformers.Trainer, or re-executed under
``accelerate launch --config_file accelerate_configs/<name>.yaml``.

``train_adapter`` is the one training loop behind both ``train.guard`` and ``train.lm``: it
builds TrainingArguments from a recipe section (global batch fixed, accumulation derived from
the world size), a Trainer with a seeded length-grouped sampler, trains one adapter per seed
(checkpoints every ``save_steps``; ``resume`` continues from the last one) and writes the final
adapter folder atomically on the main process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from mood_data.errors import RecipeError

from .recipe import REPO_ROOT, Recipe, TrainSection, accelerate_config_path, gradient_accumulation_steps, load_recipe

CPU_CONFIGS = ("cpu",)


# ---------------------------------------------------------------------------------------------
# re-exec under accelerate launch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolved_config_file(name: str) -> Path:
    """The accelerate config with relative file paths (DeepSpeed json) made absolute, so that
    launching works from any working directory."""
    path = accelerate_config_path(name)
    if not path.is_file():
        raise RecipeError(f"accelerate config {name!r}: {path} not found")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    ds = cfg.get("deepspeed_config") or {}
    rel = ds.get("deepspeed_config_file")
    if not rel or Path(rel).is_absolute():
        return path
    ds["deepspeed_config_file"] = str((REPO_ROOT / rel).resolve())
    fd, tmp = tempfile.mkstemp(prefix=f"accelerate-{name}-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return Path(tmp)


def launch_command(config: str, module: str, argv: Sequence[str], num_processes: int | None = None,
                   port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """``accelerate launch`` argv + environment for running ``python -m module argv``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(resolved_config_file(config))]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["--main_process_port", str(port or free_port()), "-m", module, *argv]
    env = dict(os.environ)
    if config in CPU_CONFIGS:
        env["ACCELERATE_USE_CPU"] = "1"  # MULTI_GPU + static rendezvous + this = real gloo ranks
    return cmd, env


def relaunch(config: str, module: str, argv: Sequence[str], num_processes: int | None = None) -> int:
    cmd, env = launch_command(config, module, argv, num_processes)
    print("moodguard: " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd, env=env)


# ---------------------------------------------------------------------------------------------
# seed members in parallel


def member_slots(parallel: int, n_members: int, procs_per_member: int, gpus: Sequence[str],
                 n_cpus: int) -> list[dict[str, str]]:
    """Environment additions of each concurrent member slot (pure).

    With GPUs, every slot gets ``procs_per_member`` of them (``CUDA_VISIBLE_DEVICES``) and the
    number of slots shrinks to what the GPUs allow; on CPU every slot gets an equal share of
    the cores as its thread count."""
    k = max(1, min(parallel, n_members))
    per = max(1, procs_per_member)
    if gpus:
        k = max(1, min(k, len(gpus) // per))
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])} for i in range(k)]
    threads = str(max(1, n_cpus // (k * per)))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(k)]


def visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in env.split(",") if g.strip()] if env else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def member_command(kind: str, recipe: Recipe, argv: Sequence[str], seed: int) -> tuple[list[str], dict[str, str]]:
    """The command that trains one seed member: ``python -m train.<kind> ... --member S``, under
    ``accelerate launch`` when the recipe names an accelerate config."""
    args = [*argv, "--member", str(seed)]
    if recipe.accelerate.config is not None:
        return launch_command(recipe.accelerate.config, f"train.{kind}", args, recipe.accelerate.num_processes)
    return [sys.executable, "-m", f"train.{kind}", *args], dict(os.environ)


def train_members_parallel(kind: str, recipe: Recipe, recipe_path: str | os.PathLike, overrides: Sequence[str],
                           resume: bool = False) -> list[Path]:
    """Train the seed members of ``recipe.<kind>`` ``parallel_members`` at a time, one process
    (or one ``accelerate launch``) each; logs go to ``<output_dir>/logs/<kind>-seed<S>.log``.
    The folders are the ones sequential training writes (``<kind>-seed<S>``)."""
    import threading

    from tqdm.auto import tqdm

    sec = recipe.section(kind)
    seeds = list(sec.seeds)
    procs = recipe.accelerate.num_processes if recipe.accelerate.config else 1
    slots = member_slots(sec.parallel_members, len(seeds), procs, visible_gpus(), os.cpu_count() or 1)
    out_root = Path(recipe.output_dir)
    logs = out_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    argv = ["--recipe", str(recipe_path), *(["--resume"] if resume else []), *overrides]
    queue, failed, lock = list(seeds), [], threading.Lock()
    bar = tqdm(total=len(seeds), desc=f"{kind} members ({len(slots)} at a time)", unit="member")

    def worker(extra_env: dict[str, str]) -> None:
        while True:
            with lock:
                if not queue:
                    return
                seed = queue.pop(0)
            cmd, env = member_command(kind, recipe, argv, seed)
            log = logs / f"{kind}-seed{seed}.log"
            with open(log, "w", encoding="utf-8") as fh:
                rc = subprocess.call(cmd, env={**env, **extra_env}, stdout=fh, stderr=subprocess.STDOUT)
            with lock:
                bar.update(1)
                if rc != 0:
                    failed.append((seed, rc, log))

    threads = [threading.Thread(target=worker, args=(env,), daemon=True) for env in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    if failed:
        seed, rc, log = failed[0]
        tail = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()][-1:]
        raise RuntimeError(f"{kind} member seed {seed} exited with {rc} (log: {log}){': ' + tail[0] if tail else ''}")
    return adapter_folders(recipe, kind)


def trains_in_parallel(recipe: Recipe, kind: str) -> bool:
    sec = recipe.section(kind)
    return sec.parallel_members > 1 and len(sec.seeds) > 1


def adapter_folders(recipe: Recipe, kind: str) -> list[Path]:
    """The final adapter folders training ``kind`` writes (one per seed)."""
    seeds = recipe.section(kind).seeds
    return [Path(recipe.output_dir) / adapter_dirname(kind, seeds, s) for s in seeds]


def train_in_process(kind: str, recipe: Recipe, resume: bool = False, only_seeds: Sequence[int] | None = None) -> Path:
    """``train.guard`` / ``train.lm`` / ``train.judge`` in this process; the first adapter folder."""
    if kind == "guard":
        from .guard import train_guard as train_fn
    elif kind == "judge":
        from .judge import train_judge as train_fn
    else:
        from .lm import train_lm as train_fn
    return train_fn(recipe, resume, only_seeds)


def run_training(kind: str, recipe: Recipe, recipe_path: str | os.PathLike, overrides: Sequence[str],
                 resume: bool = False) -> int:
    """Train ``kind`` the way the recipe asks (what ``moodguard train`` and sweep stages run):
    seed members in parallel processes (``<kind>.parallel_members > 1``), else re-executed under
    ``accelerate launch`` (``accelerate.config``), else in this process. Returns the exit status."""
    if trains_in_parallel(recipe, kind):
        train_members_parallel(kind, recipe, recipe_path, overrides, resume)
        return 0
    if recipe.accelerate.config is not None:
        argv = ["--recipe", str(recipe_path), *(["--resume"] if resume else []), *overrides]
        return relaunch(recipe.accelerate.config, f"train.{kind}", argv, recipe.accelerate.num_processes)
    try:
        train_in_process(kind, recipe, resume)
    finally:
        end_distributed()
    return 0


# ---------------------------------------------------------------------------------------------
# the training loop


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

    cpu = on_cpu()
    world = PartialState(cpu=cpu).num_processes
    accum = gradient_accumulation_steps(
        sec.global_batch_size, sec.per_device_batch_size, world, where=f"{recipe.source_file}: key '{kind}.global_batch_size'"
    )
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
        warmup_steps=sec.warmup_ratio,
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
        gradient_checkpointing=sec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if sec.gradient_checkpointing else None,
        report_to=[] if recipe.report_to == "none" else [recipe.report_to],
        bf16=(recipe.dtype == "bfloat16" and not cpu),
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and world > 1 else None,
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


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` that was written completely (a process killed while saving
    leaves one without ``trainer_state.json``, which Trainer writes last)."""
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


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
    tokenizer = load_tokenizer(recipe.tokenizer or recipe.model, recipe.trust_remote_code)
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
        last = last_complete_checkpoint(ckpt_dir) if resume else None
        train_out = trainer.train(resume_from_checkpoint=last)
        val = trainer.evaluate()
        staging = out_root / f".{name}.staging"
        trainer.save_model(str(staging))
        trainer.accelerator.wait_for_everyone()
        final = out_root / name
        if trainer.is_world_process_zero():
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
            }
            with atomic_dir(final) as tmp:
                for f in staging.iterdir():
                    if f.is_file() and f.suffix != ".bin":  # skip Trainer's pickled training_args.bin
                        shutil.copy2(f, tmp / f.name)
                _write_run_files(tmp, recipe, metrics)
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


def end_distributed() -> None:
    """Tear down the process group at the end of a launched run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# `python -m train.guard|train.lm` entry point


def module_parser(kind: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m train.{kind}", description=f"train the {kind} LoRA adapter")
    p.add_argument("--recipe", required=True, help="recipes/<family>/<size>.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--member", type=int, default=None, metavar="SEED",
                   help="train only this seed member of the seed list (what --parallel members run)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides")
    return p


def module_main(kind: str, train_fn: Callable[..., Any], argv: Sequence[str] | None = None) -> int:
    from mood_data.errors import MoodguardError

    args = module_parser(kind).parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        train_fn(recipe, args.resume, None if args.member is None else [args.member])
    except MoodguardError as err:
        print(f"moodguard train {kind}: error: {err}", file=sys.stderr)
        return 2
    finally:
        end_distributed()
    return 0
