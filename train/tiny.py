"""Tiny Llama-architecture backbones that the project builds itself (no hub needed).

This module holds the shapes, the tokenizer builder and the random-init builder. The
pretraining loop (`pretrain`) and the shipped, pretrained models under
``mood_data/embedded/models/`` build on it.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mood_data.atomic import atomic_dir, write_json, write_text
from mood_data.readers import sha256_file
from mood_data.render import TURN_END, TURN_START

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}
TURN_TOKENS = [TURN_START, TURN_END]

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
    # the bottom of the shipped ladder: little more than an embedding table (span l/xxs >= 30x)
    "xxs": dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
    # a few thousand parameters beyond the embeddings: for unit tests only
    "xs": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
    "s": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "m": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "l": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 1024):
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
        model_max_length=model_max_length,
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


# ---------------------------------------------------------------------------------------
# The shipped family: corpus, pretraining, evaluation, build
# ---------------------------------------------------------------------------------------

_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODELS_DIR = _ROOT / "mood_data" / "embedded" / "models"
EMBEDDED_TRAIN_CORPUS = _ROOT / "mood_data" / "embedded" / "benchmark" / "train.jsonl.gz"
FAMILY: tuple[str, ...] = ("xxs", "s", "m", "l")
STORAGE_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class PretrainConfig:
    """Causal-LM pretraining settings (one fixed recipe for the whole family)."""

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    # learning_rate is the rate of models up to this hidden width; wider ones get
    # learning_rate * width / hidden (1/width scaling: at 3e-3 the 192-wide tiny-l diverged
    # early and ended worse than tiny-m with the same tokens)
    lr_reference_width: int = 128

    def for_size(self, size: str) -> "PretrainConfig":
        """The settings one size trains with (same steps/batch/tokens; width-scaled learning rate)."""
        from dataclasses import replace

        hidden = TINY_SIZES[size]["hidden_size"]
        return replace(self, learning_rate=self.learning_rate * min(1.0, self.lr_reference_width / hidden))


def _hh_rlhf_messages(text: str) -> list[dict]:
    """``\\n\\nHuman: ...\\n\\nAssistant: ...`` (Anthropic hh-rlhf) -> chat messages."""
    parts = re.split(r"\n\n(Human|Assistant): ?", "\n\n" + text.strip())
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def read_corpus(path: str | Path) -> list[str]:
    """Conversation strings from a ``.jsonl`` / ``.jsonl.gz`` file.

    Rows carry a rendered ``conversation`` (the MOOD schema) or, as a stand-in corpus, an
    hh-rlhf ``chosen`` transcript that is rendered with :func:`mood_data.render.render`.
    """
    from mood_data.errors import DataError
    from mood_data.readers import jsonl_rows
    from mood_data.render import render

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: corpus file not found")
    texts: list[str] = []
    for i, row in jsonl_rows(path, DataError):
        if isinstance(row.get("conversation"), str):
            texts.append(row["conversation"])
        elif isinstance(row.get("chosen"), str):
            texts.append(render(_hh_rlhf_messages(row["chosen"])))
        else:
            raise DataError(f"{path}: row {i}: field 'conversation': missing or not a string")
    if not texts:
        raise DataError(f"{path}: no conversations")
    return texts


def split_heldout(texts: Sequence[str], fraction: float = 0.02, seed: int = 0,
                  max_heldout: int = 200) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) split of the corpus; the held-out part is never trained on."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n = min(max_heldout, max(1, int(round(fraction * len(texts)))))
    held = set(order[:n])
    return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]


def pack(tokenizer, texts: Iterable[str], seq_len: int):
    """Concatenate ``<bos> text <eos>`` token streams and cut them into ``seq_len`` blocks."""
    import datasets

    ids: list[int] = []
    for text in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    blocks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def pretrain(model, tokenizer, texts: Sequence[str], cfg: PretrainConfig, work_dir: str | Path) -> dict:
    """Train ``model`` in place with the causal-LM objective (plain ``transformers.Trainer``).

    Returns ``{"steps", "final_train_loss", "mean_train_loss", "tokens_seen", "seconds"}``.
    """
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    set_seed(cfg.seed)
    data = pack(tokenizer, texts, cfg.seq_len)
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(cfg.warmup_steps, max(cfg.steps - 1, 0)),
        weight_decay=cfg.weight_decay,
        logging_steps=max(1, cfg.steps // 10),
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.eval()
    return {
        "steps": int(out.global_step),
        "final_train_loss": float(losses[-1]) if losses else float(out.training_loss),
        "mean_train_loss": float(out.training_loss),
        "tokens_seen": int(out.global_step) * cfg.batch_size * cfg.seq_len,
        "packed_blocks": len(data),
        "seconds": round(seconds, 1),
    }


def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 512, batch_size: int = 8) -> float:
    """Token-level perplexity of ``texts`` (each scored on its own, ``<bos>`` prepended,
    left-truncated to ``max_length``); the NLL sum is accumulated in float64."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in tqdm(range(0, len(texts), batch_size), desc="perplexity", disable=None, leave=False):
            batch = [tokenizer.bos_token + t for t in texts[i:i + batch_size]]
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length, add_special_tokens=False)
            mask = enc["attention_mask"]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos).logits
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            target = enc["input_ids"][:, 1:]
            tok_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            keep = mask[:, 1:].bool() & mask[:, :-1].bool()
            nll += float(tok_nll[keep].sum())
            count += int(keep.sum())
    return math.exp(nll / max(count, 1))


def parameter_counts(model) -> dict[str, int]:
    """``{"total", "embedding", "non_embedding"}`` with tied weights counted once."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return {"total": int(total), "embedding": int(emb), "non_embedding": int(total - emb)}


def save_model(model, tokenizer, out_dir: str | Path, storage_dtype: str = "bfloat16") -> Path:
    """Write ``model`` (weights in ``storage_dtype``) + tokenizer as an HF folder.

    ``config.json`` keeps ``dtype: float32`` so a plain ``from_pretrained`` computes in
    float32 even when the stored weights are bfloat16. The chat template goes into
    ``tokenizer_config.json`` (no separate ``.jinja`` file).
    """
    import torch

    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {storage_dtype!r} not in {STORAGE_DTYPES}")
    out_dir = Path(out_dir)
    model.to(getattr(torch, storage_dtype)).save_pretrained(out_dir, safe_serialization=True)
    model.to(torch.float32)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    write_json(cfg_path, cfg)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    return out_dir


def build_family(out_dir: str | Path = EMBEDDED_MODELS_DIR, sizes: Sequence[str] = FAMILY,
                 corpus: str | Path | None = None, cfg: PretrainConfig = PretrainConfig(),
                 vocab_size: int = 4096, storage_dtype: str = "bfloat16", threads: int | None = None) -> dict:
    """Train the shared tokenizer, then build + pretrain + save each size under ``out_dir/tiny-<size>``.

    ``threads`` sets ``torch.set_num_threads`` (1 is much faster on a busy shared CPU).
    Each model folder is swapped in atomically. ``out_dir/build.json`` (merged with the
    entries of sizes built earlier) and ``out_dir/README.md`` record how they were made.
    """
    import tempfile

    import torch
    from transformers import LlamaForCausalLM

    from mood_data.errors import MoodguardError

    unknown = [s for s in sizes if s not in TINY_SIZES]
    if unknown:
        raise MoodguardError(f"--sizes: unknown size(s) {', '.join(unknown)}; choose from {', '.join(TINY_SIZES)}")
    corpus = Path(corpus) if corpus is not None else EMBEDDED_TRAIN_CORPUS
    if not corpus.is_file():
        raise MoodguardError(f"{corpus}: corpus not found (build the embedded benchmark with "
                             f"'moodguard data build' or pass --corpus PATH)")
    out_dir = Path(out_dir)
    texts = read_corpus(corpus)
    train_texts, held_texts = split_heldout(texts, seed=cfg.seed)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size)
    tok_seconds = time.perf_counter() - t0

    if threads:
        torch.set_num_threads(threads)
    info = {
        "corpus": _display_path(corpus),
        "corpus_sha256": sha256_file(corpus),
        "corpus_conversations": len(texts),
        "heldout_conversations": len(held_texts),
        "vocab_size": len(tokenizer),
        "pretrain": asdict(cfg),
        "storage_dtype": storage_dtype,
        "tokenizer_seconds": round(tok_seconds, 1),
    }
    models: dict[str, dict] = {}
    for size in sizes:
        name = f"tiny-{size}"
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(tiny_config(size, tokenizer))
        counts = parameter_counts(model)
        random_ppl = perplexity(model, tokenizer, held_texts)
        size_cfg = cfg.for_size(size)
        with tempfile.TemporaryDirectory(prefix=f"moodguard-{name}-") as work:
            stats = pretrain(model, tokenizer, train_texts, size_cfg, work)
        with atomic_dir(out_dir / name) as tmp:
            save_model(model, tokenizer, tmp, storage_dtype)
        # score what was shipped (weights rounded to the storage dtype)
        model.to(getattr(torch, storage_dtype)).to(torch.float32)
        models[name] = {
            "params": counts["total"],
            "non_embedding_params": counts["non_embedding"],
            "shape": dict(TINY_SIZES[size]),
            **stats,
            "heldout_perplexity": round(perplexity(model, tokenizer, held_texts), 2),
            "random_init_perplexity": round(random_ppl, 2),
            "tokenizer_sha256": sha256_file(out_dir / name / "tokenizer.json"),
            "pretrain": asdict(size_cfg),
        }
    # merge with the records of sizes built earlier (re-read now: another build may have finished)
    build_path = out_dir / "build.json"
    previous = json.loads(build_path.read_text()).get("models", {}) if build_path.is_file() else {}
    models = {**previous, **models}
    info["models"] = {k: models[k] for k in sorted(models, key=_size_order)}
    write_json(build_path, info)
    write_text(out_dir / "README.md", models_readme(info))
    return info


def _size_order(name: str) -> int:
    order = list(TINY_SIZES)
    return order.index(name.split("-", 1)[1]) if name.split("-", 1)[-1] in order else len(order)


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(_ROOT))
    except ValueError:
        return str(path)


def models_readme(info: dict) -> str:
    """The README of the embedded models folder, generated from ``build.json``."""
    models = info["models"]
    rows = "\n".join(
        f"| `{name}` | {m['params']:,} | {m['non_embedding_params']:,} | "
        f"{m['shape']['hidden_size']} / {m['shape']['num_hidden_layers']} / {m['shape']['intermediate_size']} / "
        f"{m['shape']['num_attention_heads']}:{m['shape']['num_key_value_heads']} | "
        f"{m['steps']} x {m['pretrain']['batch_size']} x {m['pretrain']['seq_len']} | {m['pretrain']['learning_rate']:g} | "
        f"{m['final_train_loss']:.3f} | {m['heldout_perplexity']:.1f} | {m['random_init_perplexity']:.0f} | {m['seconds']:.0f} |"
        for name, m in models.items()
    )
    groups: dict[str, list[str]] = {}
    for name, m in models.items():
        p = m["pretrain"]
        key = f"--steps {p['steps']} --batch-size {p['batch_size']} --seq-len {p['seq_len']} --seed {p['seed']}"
        groups.setdefault(key, []).append(name.split("-", 1)[1])
    commands = "\n".join(f"    moodguard models build-tiny --sizes {','.join(v)} {k}" for k, v in groups.items())
    p = next(iter(models.values()))["pretrain"]
    hashes = {m["tokenizer_sha256"] for m in models.values()}
    warn = "" if len(hashes) == 1 else (
        "\n**Warning:** the folders were built with different tokenizers; rebuild all sizes together.\n")
    count = {1: "One", 2: "Two", 3: "Three", 4: "Four", 5: "Five"}.get(len(models), str(len(models)))
    params = [m["params"] for m in models.values()]
    ppl = [m["heldout_perplexity"] for m in sorted(models.values(), key=lambda m: m["params"])]
    ladder = ("held-out perplexity falls strictly with size" if all(a > b for a, b in zip(ppl, ppl[1:]))
              else "**held-out perplexity does NOT fall strictly with size: rebuild**")
    return f"""# Embedded tiny backbones

{count} Llama-architecture causal LMs of one family ({max(params) / min(params):.0f}x parameter span; {ladder}), built and pretrained by this project on
CPU so that every pipeline stage (guard LoRA, causal-LM LoRA, OOD statistics, sweeps) can run
without a model hub. They are small language models of MOOD-style conversations, not
general-purpose LMs. Load them with the ordinary code paths, e.g.
`AutoModelForCausalLM.from_pretrained("mood_data/embedded/models/tiny-m")` or
`AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)`; the name
`embedded:tiny-m` resolves to the folder.

| model | params (total, tied) | non-embedding | hidden / layers / MLP / heads:kv | steps x batch x tokens | peak lr | final train loss | held-out ppl | random-init ppl | train s |
|---|---:|---:|---|---|---:|---:|---:|---:|---:|
{rows}
{warn}
* Tokenizer: one shared byte-level BPE, vocabulary {info['vocab_size']} (specials `<pad>` `<bos>`
  `<eos>` `<unk>` `<start_of_turn>` `<end_of_turn>`), trained on the corpus below minus the
  held-out slice. Left padding and left truncation by default (keep the end of a
  conversation); the chat template reproduces `mood_data.render.render`.
* Corpus: `{info['corpus']}` ({info['corpus_conversations']:,} conversations, sha256
  `{info['corpus_sha256'][:16]}…`); a deterministic {info['heldout_conversations']}-conversation
  held-out slice (seed {p['seed']}) is used only for the perplexities above.
* Pretraining: causal-LM objective, `transformers.Trainer`, AdamW, the same steps, batch and
  block length (so the same tokens) for every size; peak lr {p['learning_rate']} up to hidden
  width 128, scaled by 128 / width above it (1/width: at the full rate the 192-wide `tiny-l`
  diverged early and ended behind `tiny-m`); cosine schedule with 10 % warm-up, weight decay {p['weight_decay']}, packed
  `<bos> conversation <eos>` blocks, CPU, float32. "train s" is wall time on a shared 2-core CPU.
* Stored weights: `{info['storage_dtype']}` safetensors (config `dtype` is float32, so
  `from_pretrained` computes in float32); perplexities are measured on the stored weights.
* Rebuild (deterministic for a given machine and thread count):

{commands}

  Full details: `build.json`.

## Licence

Built by the moodguard project from the embedded benchmark's train split, whose sources are
MIT / Apache-2.0 licensed (see `mood_data/embedded/benchmark/PROVENANCE.md`). The weights and
tokenizer are released under the project's MIT licence.
"""
