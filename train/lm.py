"""Causal-LM adapter: LoRA (peft ``TaskType.CAUSAL_LM``) of ``AutoModelForCausalLM`` on the
ID-SAFE train conversations; the perplexity reference for the OOD detector.

    python -m train.lm --recipe recipes/tiny/s.yaml [--resume] [key=value ...]
    accelerate launch --config_file accelerate_configs/ddp.yaml -m train.lm --recipe R
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .guard import lora_config
from .entry import module_main
from .loop import AdapterJob, train_adapter
from .recipe_schema import Recipe


def build_lm_model(recipe: Recipe, tokenizer, section: str = "lm"):
    """LoRA (``TaskType.CAUSAL_LM``) on the recipe's causal LM, with the LoRA settings of
    ``section`` (``lm`` here; the judge reuses it with ``judge``)."""
    from peft import TaskType, get_peft_model

    from .distributed import peft_model_kwargs
    from .modeling import check_lora, load_causal_lm, without_embedding_tables

    kwargs = {"attn_implementation": recipe.attn_implementation} if recipe.attn_implementation else {}
    model = load_causal_lm(recipe.model, None, recipe.dtype, recipe.trust_remote_code, **kwargs)
    model.config.use_cache = False
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    check_lora(model, recipe, section)  # before peft allocates the LoRA matrices
    # under ZeRO-3: autocast_adapter_dtype=False (DeepSpeed issue 8072)
    return without_embedding_tables(get_peft_model(model, lora_config(recipe, section, TaskType.CAUSAL_LM),
                                                   **peft_model_kwargs()))


def build_lm_datasets(recipe: Recipe, tokenizer):
    import datasets

    from .data import tokenize_lm, train_validation_cut

    train, validation = train_validation_cut(recipe)
    return datasets.DatasetDict(train=tokenize_lm(train, tokenizer, recipe.lm.max_length),
                                validation=tokenize_lm(validation, tokenizer, recipe.lm.max_length))


def lm_collator(recipe: Recipe, tokenizer):
    from .data import lm_collator as make

    return make(tokenizer, recipe.lm.pad_to_multiple_of, recipe.lm.packing)


LM_JOB = AdapterJob("lm", build_lm_model, build_lm_datasets, lm_collator, None, None)


def train_lm(recipe: Recipe, resume: bool = False, only_seeds: Sequence[int] | None = None) -> Path:
    """Train the causal-LM adapter(s); returns the first adapter folder (``<output_dir>/lm``)."""
    return train_adapter(recipe, LM_JOB, resume, only_seeds)[0]


def main(argv=None) -> int:
    return module_main("lm", train_lm, argv)


if __name__ == "__main__":
    sys.exit(main())
