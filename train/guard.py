"""Guard training: LoRA (peft ``TaskType.SEQ_CLS``) on ``AutoModelForSequenceClassification``
with ``num_labels=2`` (label 1 = unsafe). The ``score`` head is trained and saved inside the
adapter (``modules_to_save``); guard score = logit[1] - logit[0], higher = more unsafe.

    python -m train.guard --recipe recipes/tiny/s.yaml [--resume] [key=value ...]
    accelerate launch --config_file accelerate_configs/ddp.yaml -m train.guard --recipe R
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from mood_data.errors import RecipeError

from .entry import module_main
from .loop import AdapterJob, train_adapter
from .recipe_schema import Recipe


def guard_score(logits) -> np.ndarray:
    """logit[1] - logit[0] in float64 (higher = more unsafe)."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits[:, 1] - logits[:, 0]


def compute_guard_metrics(eval_pred) -> dict:
    """Validation accuracy and AUROC of the guard score (loss comes from the Trainer)."""
    from sklearn.metrics import roc_auc_score

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    labels = np.asarray(labels).astype(int)
    score = guard_score(logits)
    out = {"accuracy": float(np.mean((score > 0).astype(int) == labels))}
    out["auroc"] = float(roc_auc_score(labels, score)) if len(np.unique(labels)) == 2 else float("nan")
    return out


def lora_config(recipe: Recipe, kind: str, task_type):
    from peft import LoraConfig

    lo = recipe.section(kind).lora
    return LoraConfig(task_type=task_type, r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                      target_modules=lo.target_modules)


def adapted_model(model, recipe: Recipe, kind: str, task_type):
    """``model`` with its LoRA: a fresh one (``get_peft_model``), or with ``<kind>.init_adapter``
    the weights of that adapter (a guard's head too), trainable (the warm start of ``moodguard
    refresh --mode continue``); shapes are checked with the recipe (train.recipe_checks)."""
    from peft import PeftModel, get_peft_model

    from .distributed import peft_model_kwargs
    from .modeling import without_embedding_tables

    config = lora_config(recipe, kind, task_type)
    init = recipe.section(kind).init_adapter
    if init is None:  # under ZeRO-3: autocast off (DeepSpeed 8072)
        return without_embedding_tables(get_peft_model(model, config, **peft_model_kwargs()))
    try:
        return without_embedding_tables(PeftModel.from_pretrained(model, init, config=config, is_trainable=True,
                                                                  **peft_model_kwargs()))
    except (RuntimeError, ValueError, OSError) as exc:  # a weight of another shape, an unreadable file
        raise RecipeError(f"{recipe.source_file}: key '{kind}.init_adapter': {init}: cannot be loaded "
                          f"({' '.join(str(exc).split())[:200]})") from None


def build_guard_model(recipe: Recipe, tokenizer):
    from peft import TaskType

    from .modeling import check_lora, load_guard_model

    kwargs = {"attn_implementation": recipe.attn_implementation} if recipe.attn_implementation else {}
    model = load_guard_model(recipe.model, None, recipe.dtype, recipe.trust_remote_code, num_labels=2, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    check_lora(model, recipe, "guard")  # before peft allocates the LoRA matrices
    return adapted_model(model, recipe, "guard", TaskType.SEQ_CLS)


def build_guard_datasets(recipe: Recipe, tokenizer):
    import datasets

    from .data import tokenize_guard, train_validation_cut

    train, validation = train_validation_cut(recipe)
    return datasets.DatasetDict(train=tokenize_guard(train, tokenizer, recipe.guard.max_length),
                                validation=tokenize_guard(validation, tokenizer, recipe.guard.max_length))


def guard_collator(recipe: Recipe, tokenizer):
    from .data import guard_collator as make

    return make(tokenizer, recipe.guard.pad_to_multiple_of)


def init_guard_head(recipe: Recipe, trainer, datasets) -> dict | None:
    """``guard.init_head: probe``: the LP-FT head (train/probe.py); ``random``: peft's fresh head."""
    from .probe import probe_head_init

    return probe_head_init(recipe, trainer, datasets)


GUARD_JOB = AdapterJob("guard", build_guard_model, build_guard_datasets, guard_collator, compute_guard_metrics,
                       mean_loss=True, best_metric="auroc", greater_is_better=True, init_model=init_guard_head)


def train_guard(recipe: Recipe, resume: bool = False, only_seeds: Sequence[int] | None = None) -> Path:
    """Train the guard adapter(s); returns the first adapter folder (``<output_dir>/guard``)."""
    return train_adapter(recipe, GUARD_JOB, resume, only_seeds)[0]


def main(argv=None) -> int:
    return module_main("guard", train_guard, argv)


if __name__ == "__main__":
    sys.exit(main())
