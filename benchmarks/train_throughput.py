"""Guard-training throughput: our trainer (seeded length-grouped batches, pad to multiple of 8,
position ids from the mask) vs a plain ``Trainer`` + PEFT LoRA script with dynamic padding in
dataset order, in the same process, on the same data and model.

    python benchmarks/train_throughput.py --recipe recipes/tiny/s.yaml [--random-init] [--steps N] [k=v ...]

Reports real (non-pad) tokens/s, padding fraction, peak memory and MFU = 6 * N * tokens / time /
peak FLOP/s (N = backbone parameters). On CPU there is no meaningful peak, so MFU is n/a unless
``--peak-tflops`` is given. ``--random-init`` builds the backbone from ``config.json`` (or the
recipe's ``config_shape`` for hub ids that cannot be reached) with random weights.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# nominal dense bf16 peaks (FLOP/s) for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class CountingCollator:
    def __init__(self, inner):
        self.inner, self.real, self.padded = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.real += int(batch["attention_mask"].sum())
        self.padded += int(batch["attention_mask"].numel())
        return batch


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(recipe, tokenizer, random_init: bool):
    import torch
    from peft import TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from train.guard import build_guard_model, lora_config
    from train.modeling import resolve_model, torch_dtype

    if not random_init:
        return build_guard_model(recipe, tokenizer)
    try:
        cfg = AutoConfig.from_pretrained(resolve_model(recipe.model))
    except OSError:
        if not recipe.config_shape:
            raise SystemExit(f"{recipe.model}: config.json unreachable and the recipe has no config_shape")
        shape = dict(recipe.config_shape)
        cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
    cfg.num_labels, cfg.pad_token_id = 2, tokenizer.pad_token_id
    dtype = torch_dtype(recipe.dtype) if torch.cuda.is_available() else torch.float32
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=dtype)
    return get_peft_model(model, lora_config(recipe, "guard", TaskType.SEQ_CLS))


def run_one(label, recipe, tokenizer, ds, random_init, steps, ours: bool, out_dir: Path) -> dict:
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from train.data import guard_collator
    from train.launch import make_trainer_class, on_cpu
    from train.modeling import count_parameters

    sec = recipe.guard
    set_seed(0)
    model = build_model(recipe, tokenizer, random_init)
    n_params = count_parameters(model)
    args = TrainingArguments(
        output_dir=str(out_dir / label), per_device_train_batch_size=sec.per_device_batch_size,
        gradient_accumulation_steps=sec.global_batch_size // sec.per_device_batch_size,
        learning_rate=sec.learning_rate, max_steps=steps, save_strategy="no", report_to=[], logging_steps=10**6,
        use_cpu=on_cpu(), bf16=(recipe.dtype == "bfloat16" and not on_cpu()), label_names=["labels"],
        gradient_checkpointing=sec.gradient_checkpointing, disable_tqdm=True,
        train_sampling_strategy="random" if ours else "sequential",
    )
    if ours:
        collator = CountingCollator(guard_collator(tokenizer, sec.pad_to_multiple_of))
        trainer = make_trainer_class()(model=model, args=args, train_dataset=ds, data_collator=collator,
                                       lengths=ds["length"], group_size=sec.global_batch_size,
                                       group_by_length=True, mean_loss=True)
    else:
        collator = CountingCollator(DataCollatorWithPadding(tokenizer))
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t0
    return {"label": label, "seconds": secs, "tokens_per_s": collator.real / secs,
            "padding_fraction": 1 - collator.real / max(collator.padded, 1), "peak_mb": peak_memory_mb(),
            "params": n_params, "flops_per_s": 6 * n_params * collator.real / secs}


def main(argv=None) -> int:
    import tempfile

    import torch

    from train.data import load_train_split, tokenize_guard
    from train.modeling import load_tokenizer
    from train.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokenizer", default=None, help="tokenizer when the recipe's model is unreachable")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: known GPUs; CPU n/a)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    recipe = load_recipe(a.recipe, a.overrides)
    tokenizer = load_tokenizer(a.tokenizer or recipe.tokenizer or recipe.model)
    raw = load_train_split(recipe.data.source, recipe.data.template, recipe.data.registry)
    ds = tokenize_guard(raw, tokenizer, recipe.guard.max_length)
    peak = a.peak_tflops * 1e12 if a.peak_tflops else None
    if peak is None and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_one(lbl, recipe, tokenizer, ds, a.random_init, a.steps, ours, Path(tmp))
                for lbl, ours in (("plain", False), ("moodguard", True))]
    print(f"recipe {recipe.name}: {len(ds)} rows, {a.steps} steps, global batch {recipe.guard.global_batch_size}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'trainer':<10} {'tokens/s':>10} {'pad frac':>9} {'peak MB':>9} {'MFU':>7} {'seconds':>8}")
    for r in rows:
        mfu = f"{r['flops_per_s'] / peak:.3f}" if peak else "n/a"
        print(f"{r['label']:<10} {r['tokens_per_s']:>10.0f} {r['padding_fraction']:>9.3f} {r['peak_mb']:>9.0f} {mfu:>7} {r['seconds']:>8.2f}")
    print(f"speed-up (real tokens/s, moodguard / plain): {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
