"""A guard whose LoRA adapts the embedding table (the tiny recipes since 6e831cf): peft wraps
``embed_tokens``; the bundle's vocabulary check must still read the table's rows (it raised
AttributeError 'Embedding' object has no attribute 'num_embeddings', so no such bundle loaded)."""
from __future__ import annotations

import pytest

from mood_data.errors import BundleError


def test_vocab_check_reads_a_lora_wrapped_embedding(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from eval.engine.adapters import check_vocab

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = model.get_input_embeddings().num_embeddings
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    assert not hasattr(wrapped.get_input_embeddings(), "num_embeddings")  # what the old code read
    check_vocab(tmp_path, tiny_tokenizer, wrapped, "tiny")  # the tokenizer fits: no error
    big = dict(tiny_tokenizer.get_vocab())

    class Tok:
        def get_vocab(self):
            return {**big, "<beyond>": rows}

    with pytest.raises(BundleError, match=f"token id {rows} is beyond the {rows} embedding rows"):
        check_vocab(tmp_path, Tok(), wrapped, "tiny")
