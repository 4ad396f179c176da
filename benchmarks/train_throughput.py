"""Guard-training throughput: our trainer vs a plain ``Trainer`` + PEFT LoRA script, same process.

    python benchmarks/train_throughput.py --recipe recipes/tiny/s.yaml [--steps N] [k=v ...]
    python benchmarks/train_throughput.py --recipe recipes/qwen2.5/0.5b.yaml --random-init \\
        --target-median 450 --max-length 2048 --steps 6 --json out/train-0.5b.json

Both trainers train the guard LoRA (``AutoModelForSequenceClassification`` + peft SEQ_CLS) on
the SAME ``steps * global_batch_size`` rows with the same ``TrainingArguments`` (from
``train.loop.training_arguments``: bf16 on CUDA, the recipe's accumulation and gradient
checkpointing) and the same model (sdpa attention). Only the data path differs:

* plain: dataset order (sequential sampler), ``DataCollatorWithPadding`` (pad to the batch max);
* moodguard: ``MoodTrainer``'s seeded length-grouped sampler (groups of one global batch, the
  benchmark rows sorted together as one mega-batch, as 50 global batches are in a real epoch),
  ``guard_collator`` (pad to a multiple of 8, position ids from the mask); with
  ``--max-tokens-per-forward`` a micro-batch wider than that runs as row chunks, each trimmed to
  its own width (same gradient, bounded activation memory: a 0.5B guard keeps ~2.3 MB of
  activations per token, so 16 x 2048 tokens would not fit in 80 GB).

Reports real (non-pad) tokens/s, padding fraction, peak memory and MFU = 6 * N * real tokens/s /
peak FLOP/s (N = backbone parameters incl. embeddings; CPU: n/a unless ``--peak-tflops``). The
timer runs from ``on_train_begin`` to ``on_train_end``, after one untimed warm-up step on short rows.
``--random-init`` builds the backbone from the recipe's ``config_shape`` (real vocab) with random
weights, directly on the GPU; an unreachable hub tokenizer falls back to the embedded tiny one.
``--target-median`` makes conversation-like lengths (see ``benchmarks/common.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (benchmark_tokenizer, device_name, free_memory, is_oom, length_summary,  # noqa: E402
                               load_rows, peak_flops, peak_memory_mb, random_model, recipe_config, reset_peak,
                               run_dtype, sync, token_rows, write_json)


class RowDataset(torch.utils.data.Dataset):
    """Token rows as ``{input_ids, attention_mask, labels}`` dicts (no ``datasets`` needed)."""

    def __init__(self, rows: list[list[int]], labels: list[int]):
        self.rows, self.labels = rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        ids = self.rows[i]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": self.labels[i]}


class TokenCounter:
    """Forward pre-hook on the model: counts real (mask ones) and computed positions of every
    forward that actually runs (after any row chunking), accumulating on the device."""

    def __init__(self, model):
        self.real, self.padded = 0, 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None:
            self.real = self.real + mask.sum()
            self.padded += mask.numel()

    def totals(self) -> tuple[int, int]:
        self.handle.remove()
        return int(self.real), int(self.padded)


def timer_callback():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        start = end = 0.0

        def on_train_begin(self, args, state, control, **kw):
            sync()
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            sync()
            self.end = time.perf_counter()

    return Timer()


def plain_trainer_class():
    """``Trainer`` reading the data in dataset order (a plain fine-tuning script)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class PlainTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    return PlainTrainer


def build_model(recipe, tokenizer, random_init: bool):
    from peft import TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from train.guard import build_guard_model, lora_config

    if not random_init:
        return build_guard_model(recipe, tokenizer)
    cfg = recipe_config(recipe, tokenizer)
    cfg.num_labels = 2
    model = random_model(AutoModelForSequenceClassification, cfg, run_dtype(recipe),
                         recipe.attn_implementation or "sdpa")
    return get_peft_model(model, lora_config(recipe, "guard", TaskType.SEQ_CLS))


def make_trainer(ours: bool, model, args, ds: RowDataset, collator, callbacks, steps: int,
                 max_tokens: int | None = None, multiple: int | None = None):
    from train.loop import make_trainer_class

    common = dict(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=callbacks)
    if ours:
        return make_trainer_class()(**common, lengths=[len(r) for r in ds.rows], group_size=args.train_batch_size
                                    * args.gradient_accumulation_steps, group_by_length=True, mean_loss=True,
                                    mega_batch_mult=min(steps, 50), max_tokens_per_forward=max_tokens,
                                    pad_to_multiple_of=multiple)
    return plain_trainer_class()(**common)


def warm_up(ours: bool, model, args, ds: RowDataset, collator, length: int = 128, **kw) -> None:
    """One untimed optimizer step (``args``: the run's, with ``max_steps=1``) of the same trainer
    type on short rows: kernel selection, allocator growth, Trainer/optimizer first-call costs."""
    n = args.train_batch_size * args.gradient_accumulation_steps
    short = RowDataset([r[-length:] for r in ds.rows[:n]], ds.labels[:n])
    make_trainer(ours, model, args, short, collator, [], 1, **kw).train()
    sync()


def run_one(label: str, recipe, tokenizer, ds: RowDataset, random_init: bool, steps: int, out_dir: Path,
            max_tokens: int | None = None) -> dict:
    from transformers import DataCollatorWithPadding, set_seed

    from train.data import guard_collator
    from train.loop import training_arguments
    from train.modeling import count_parameters

    sec = recipe.guard
    ours = label == "moodguard"
    set_seed(0)
    model = build_model(recipe, tokenizer, random_init)
    n_params = count_parameters(model)
    args = training_arguments(recipe, sec, "guard", 0, out_dir / label, f"bench-{label}")
    args.disable_tqdm = True
    inner = guard_collator(tokenizer, sec.pad_to_multiple_of) if ours else DataCollatorWithPadding(tokenizer)
    kw = {"max_tokens": max_tokens, "multiple": sec.pad_to_multiple_of} if ours else {}
    warm_args = training_arguments(recipe, dataclasses.replace(sec, max_steps=1), "guard", 0, out_dir / f"{label}-warm",
                                   f"bench-{label}-warm")
    warm_args.disable_tqdm = True
    warm_up(ours, model, warm_args, ds, inner, **kw)
    timer = timer_callback()
    trainer = make_trainer(ours, model, args, ds, inner, [timer], steps, **kw)
    counter = TokenCounter(model)
    reset_peak()
    trainer.train()
    secs = timer.end - timer.start
    real, padded = counter.totals()
    row = {"label": label, "seconds": secs, "tokens_per_s": real / secs, "real_tokens": real,
           "padding_fraction": 1 - real / max(padded, 1), "peak_mb": peak_memory_mb(),
           "params": n_params, "flops_per_s": 6 * n_params * real / secs,
           "steps": trainer.state.global_step}
    del trainer, model
    free_memory()
    return row


def main(argv=None) -> int:
    from train.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--random-init", action="store_true", help="random weights of the recipe's shape (config_shape)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (each one global batch)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the recipe's; embedded tiny if unreachable)")
    p.add_argument("--target-median", type=float, default=None,
                   help="conversation-like token lengths with this median (default: the split's rows as they are)")
    p.add_argument("--length-sigma", type=float, default=0.5, help="log-normal sigma of --target-median lengths")
    p.add_argument("--max-length", type=int, default=None, help="default: the recipe's guard.max_length")
    p.add_argument("--source", default=None, help="data source (default: the recipe's data.source)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: known GPUs; CPU n/a)")
    p.add_argument("--max-tokens-per-forward", type=int, default=0,
                   help="our trainer: run wider micro-batches as row chunks of at most this many positions (0: off)")
    p.add_argument("--only", choices=("plain", "moodguard"), default=None, help="run one trainer only")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides")
    a = p.parse_args(argv)
    overrides = [f"guard.max_steps={a.steps}", "guard.save_steps=1000000000", "guard.logging_steps=1000000000",
                 "report_to=none", "accelerate.num_processes=1", *a.overrides]  # one process here
    recipe = load_recipe(a.recipe, overrides)
    sec = recipe.guard
    max_length = a.max_length or sec.max_length
    tokenizer, tok_name = benchmark_tokenizer(recipe, a.tokenizer)
    texts, labels = load_rows("train", a.source or recipe.data.source)
    n = a.steps * sec.global_batch_size
    rows, row_labels = token_rows(tokenizer, texts, labels, n=n, max_length=max_length,
                                  target_median=a.target_median, sigma=a.length_sigma)
    if len(rows) < n:
        print(f"note: only {len(rows)} rows for {a.steps} steps of {sec.global_batch_size}; use --target-median",
              file=sys.stderr)
    ds = RowDataset(rows, row_labels)
    peak = peak_flops(a.peak_tflops)
    res = {"recipe": recipe.name, "device": device_name(), "dtype": str(run_dtype(recipe)).replace("torch.", ""),
           "random_init": a.random_init, "tokenizer": tok_name, "steps": a.steps,
           "global_batch_size": sec.global_batch_size, "per_device_batch_size": sec.per_device_batch_size,
           "gradient_checkpointing": sec.gradient_checkpointing, "max_length": max_length,
           "target_median": a.target_median, "max_tokens_per_forward": a.max_tokens_per_forward or None,
           "lengths": length_summary(rows), "peak_flops": peak,
           "torch": torch.__version__}
    failed = False
    with tempfile.TemporaryDirectory(prefix="moodguard-train-bench-") as tmp:
        for label in ("plain", "moodguard"):
            if a.only and label != a.only:
                continue
            try:
                res[label] = run_one(label, recipe, tokenizer, ds, a.random_init, a.steps, Path(tmp),
                                     a.max_tokens_per_forward or None)
                if peak:
                    res[label]["mfu"] = res[label]["flops_per_s"] / peak
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                failed = True
                res[label] = {"label": label, "error": "OOM", "message": str(exc).splitlines()[0][:300]}
            free_memory()
    if "tokens_per_s" in res.get("plain", {}) and "tokens_per_s" in res.get("moodguard", {}):
        res["speedup"] = res["moodguard"]["tokens_per_s"] / res["plain"]["tokens_per_s"]
    lens = res["lengths"]
    print(f"train {recipe.name} on {res['device']} ({res['dtype']}): {lens['rows']} rows, median {lens['median']:.0f} "
          f"tokens (max {lens['max']}), {a.steps} steps x global batch {sec.global_batch_size} "
          f"(micro {sec.per_device_batch_size}{', grad ckpt' if sec.gradient_checkpointing else ''})")
    print(f"{'trainer':<10} {'tokens/s':>10} {'pad frac':>9} {'peak MB':>9} {'MFU':>7} {'seconds':>8}")
    for label in ("plain", "moodguard"):
        r = res.get(label)
        if r is None:
            continue
        if "error" in r:
            print(f"{label:<10} {r['error']}: {r['message'][:100]}")
            continue
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "n/a"
        print(f"{label:<10} {r['tokens_per_s']:>10.0f} {r['padding_fraction']:>9.3f} {r['peak_mb']:>9.0f} {mfu:>7} "
              f"{r['seconds']:>8.2f}")
    if "speedup" in res:
        print(f"speed-up (real tokens/s, moodguard / plain): {res['speedup']:.2f}x")
    write_json(a.json, res)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
