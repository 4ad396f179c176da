"""Small synthetic GGUF checkpoints (Llama and Gemma 3 text), written with the ``gguf`` package
the way llama.cpp's converter lays them out, from a random HF model whose logits a test can
compare with the converted folder's.

llama.cpp layout facts used here: tensor names from ``gguf.get_tensor_name_map``; Llama q/k
projection rows permuted per head (rotary halves interleaved); Gemma RMSNorm weights stored
as ``1 + w``; tokenizer as metadata (``tokenizer.ggml.*``), byte-level BPE with merges
(``gpt2``) for Llama, a sentencepiece vocabulary (``llama``) for Gemma.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TEXTS = [
    "the cat sat on the mat and the dog sat on the log",
    "please call the weather function with the city name",
    "sure here is the answer to the question you asked",
]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (inverse of transformers' reverse permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tensors(writer, model, arch) -> None:
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base = key[: -len(".weight")]
        name = names.get_name(base)
        assert name is not None, key
        data = tensor.detach().float().numpy().copy()
        if arch == gguf.MODEL_ARCH.LLAMA and base.endswith("q_proj"):
            data = _permute(data, cfg.num_attention_heads)
        if arch == gguf.MODEL_ARCH.LLAMA and base.endswith("k_proj"):
            data = _permute(data, cfg.num_key_value_heads)
        if arch == gguf.MODEL_ARCH.GEMMA3 and key.endswith("norm.weight"):
            data = data + 1.0
        writer.add_tensor(f"{name}.weight", data)


def _finish(writer, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_llama_gguf(path: Path, tokenizer) -> tuple[Path, object]:
    """A random 2-layer Llama (GQA 4:2) with ``tokenizer``'s byte-level BPE vocabulary and merges,
    no pad token in the file. Returns (path, the HF model it was written from)."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("synthetic-llama")
    w.add_context_length(256)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokenizer))
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_add_bos_token(False)
    _write_tensors(w, model, gguf.MODEL_ARCH.LLAMA)
    return _finish(w, path), model


def gemma_vocabulary() -> list[tuple[str, int]]:
    """(token, gguf token type): Gemma's specials at ids 0-3, byte fallbacks, characters,
    then whole words with every prefix (so merges can be derived from the vocabulary)."""
    import gguf

    T = gguf.TokenType
    out = [("<pad>", T.CONTROL), ("<eos>", T.CONTROL), ("<bos>", T.CONTROL), ("<unk>", T.UNKNOWN),
           ("<start_of_turn>", T.USER_DEFINED), ("<end_of_turn>", T.USER_DEFINED)]
    out += [(f"<0x{b:02X}>", T.BYTE) for b in range(256)]
    chars = ["\u2581"] + list("abcdefghijklmnopqrstuvwxyz") + list(".,?!'\n")
    out += [(c, T.NORMAL) for c in chars]
    seen = {t for t, _ in out}
    for word in sorted({w for text in TEXTS for w in text.split()}):
        piece = "\u2581" + word
        for k in range(2, len(piece) + 1):
            if piece[:k] not in seen:
                seen.add(piece[:k])
                out.append((piece[:k], T.NORMAL))
    return out


def write_gemma3_gguf(path: Path) -> tuple[Path, object]:
    """A random 2-layer Gemma 3 text model (q/k norms, sliding window) with a small
    sentencepiece vocabulary that has ``<pad>`` and wants ``<bos>``."""
    import gguf
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    vocab = gemma_vocabulary()
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                           max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
                           bos_token_id=2, tie_word_embeddings=True)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random, non-trivial norm weights (the +1 offset must be undone)
        for k, p in model.named_parameters():
            if k.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("synthetic-gemma3")
    w.add_context_length(256)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(16)
    w.add_rope_freq_base(float(model.config.rope_parameters["full_attention"]["rope_theta"])
                         if "full_attention" in (model.config.rope_parameters or {}) else 1e6)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_scores([-float(i) for i in range(len(vocab))])
    w.add_token_types([t for _, t in vocab])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    _write_tensors(w, model, gguf.MODEL_ARCH.GEMMA3)
    return _finish(w, path), model
