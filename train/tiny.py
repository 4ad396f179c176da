"""Tiny Llama-architecture backbones that the project builds itself (no hub needed).

This module holds the shapes, the tokenizer builder and the random-init builder. The
pretraining loop (`pretrain`) and the shipped, pretrained models under
``mood_data/embedded/models/`` build on it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]

# Jinja chat template that reproduces mood_data.render.render_mood for plain messages.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system + m['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- if m['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = 'user' -%}{%- endif -%}"
    "{%- if m['role'] == 'tool' -%}{%- set text = '<tool_response>\n' + m['content'] + '\n</tool_response>' -%}"
    "{%- else -%}{%- set text = m['content'] -%}{%- endif -%}"
    "{%- if role == 'user' and ns.system -%}{%- set text = ns.system + text -%}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + text + '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# name -> LlamaConfig keyword arguments (vocab size comes from the tokenizer)
TINY_SIZES: dict[str, dict] = {
    # a few thousand parameters beyond the embeddings: for unit tests only
    "xs": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
    "s": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "m": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "l": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast``.

    Left padding and left truncation (keep the end of a conversation) are the defaults.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values()) + TURN_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=TURN_TOKENS,
        padding_side="left",
        truncation_side="left",
        **SPECIAL_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(size: str, tokenizer, max_position_embeddings: int = 1024):
    from transformers import LlamaConfig

    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose from {sorted(TINY_SIZES)}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **TINY_SIZES[size],
    )


def build_random_model(out_dir: str | Path, size: str, tokenizer, seed: int = 0) -> Path:
    """Save a randomly initialised tiny causal LM + tokenizer as an HF folder."""
    import torch
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(size, tokenizer))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
