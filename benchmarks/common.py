"""Shared helpers of the throughput benchmarks: data without ``datasets``, conversation-like
token lengths, the benchmark tokenizer, random-init backbones of a recipe's real shape, device
and memory helpers.

Nothing here imports ``datasets``, ``deepspeed``, ``wandb`` or ``evaluate``: the benchmarks run
on a bare torch + transformers + peft + accelerate machine.

Conversation-like lengths (``realistic_rows``): target lengths are drawn from a log-normal
with the given median and ``sigma`` (default 0.5: with batches of 16 in dataset order that is
~48% padding, the plain script's figure on the real data), clipped to ``[min_length,
max_length]``; each row is the concatenation of random benchmark conversations (token ids)
cut to its target, keeping the END (left truncation, as everywhere in moodguard). The label
of a row is the label of its last conversation.
"""
from __future__ import annotations

import gc
import os
import resource
import sys
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# nominal dense bf16 peaks (FLOP/s) for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ----------------------------------------------------------------------------- data
def load_rows(split: str, source: str | None = None) -> tuple[list[str], list[int]]:
    """(conversations, malign) of one split, validated, read without ``datasets``.

    ``source``: ``embedded`` / None (the embedded benchmark), a folder with
    ``<split>.jsonl[.gz]`` (or csv/json/parquet), or one file.
    """
    from mood_data.embedded import benchmark_dir
    from mood_data.records import read_records
    from mood_data.sources import split_files
    from mood_data.validate import validate_records

    if source in (None, "embedded"):
        path = benchmark_dir() / f"{split}.jsonl.gz"
    elif Path(source).is_dir():
        path = split_files(source, (split,))[split]
    else:
        path = Path(source)
    cols, _ = validate_records(read_records(path), label=str(path), split=split)
    return list(cols["conversation"]), [int(m) for m in cols["malign"]]


def lognormal_lengths(n: int, median: float, max_length: int, sigma: float = 0.5, min_length: int = 16,
                      seed: int = 0) -> np.ndarray:
    """``n`` integer target lengths ~ LogNormal(log(median), sigma) clipped to [min_length, max_length]."""
    rng = np.random.default_rng(seed)
    raw = np.exp(np.log(median) + sigma * rng.standard_normal(n))
    return np.clip(np.rint(raw), min_length, max_length).astype(np.int64)


def realistic_rows(pool: Sequence[Sequence[int]], labels: Sequence[int], n: int, median: float, max_length: int,
                   sigma: float = 0.5, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """``n`` token rows with conversation-like lengths built from ``pool`` (see the module doc)."""
    targets = lognormal_lengths(n, median, max_length, sigma, seed=seed)
    rng = np.random.default_rng(seed + 1)
    rows, out_labels = [], []
    for target in targets:
        ids: list[int] = []
        label = 0
        while len(ids) < target:
            j = int(rng.integers(len(pool)))
            ids.extend(pool[j])
            label = int(labels[j])
        rows.append(ids[-int(target):])
        out_labels.append(label)
    return rows, out_labels


def token_rows(tokenizer, texts: Sequence[str], labels: Sequence[int], *, n: int, max_length: int,
               target_median: float | None, sigma: float = 0.5, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Token rows for a benchmark: ``n`` conversation-like rows (``target_median`` set) or ``n``
    random rows of the split tokenised as they are (left-truncated at ``max_length``)."""
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    if target_median:
        return realistic_rows(ids, labels, n, target_median, max_length, sigma, seed)
    pick = np.random.default_rng(seed).permutation(len(ids))[:n]
    return [list(ids[i][-max_length:]) for i in pick], [int(labels[i]) for i in pick]


def length_summary(rows: Sequence[Sequence[int]]) -> dict:
    lengths = np.array([len(r) for r in rows], dtype=np.float64)
    return {"rows": len(rows), "tokens": int(lengths.sum()), "mean": float(lengths.mean()),
            "median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())}


# ----------------------------------------------------------------------------- model
def benchmark_tokenizer(recipe, override: str | None = None):
    """The recipe's tokenizer, or the embedded tiny one when it cannot be loaded (offline hub
    id): its ids are all < 4096, inside any real vocabulary, so a random model of the recipe's
    real shape (and vocab) can run on them."""
    from mood_data.embedded import default_tokenizer_path
    from train.modeling import load_tokenizer

    name = override or recipe.tokenizer or recipe.model
    try:
        return load_tokenizer(name), str(name)
    except Exception as exc:  # noqa: BLE001 - hub id unreachable offline: fall back
        fallback = default_tokenizer_path()
        if fallback is None:
            raise SystemExit(f"{name}: tokenizer unavailable ({type(exc).__name__}), no embedded tiny one") from None
        print(f"note: tokenizer {name} unavailable offline; using the embedded tiny tokenizer", file=sys.stderr)
        return load_tokenizer(str(fallback)), str(fallback)


def recipe_config(recipe, tokenizer):
    """Backbone config of the recipe: ``config_shape`` when given (no hub access needed), else
    the model's own ``config.json``. The vocabulary is kept at its real size (the LM head cost
    is realistic) and widened only if the tokenizer is larger."""
    from transformers import AutoConfig

    from train.modeling import resolve_model

    if recipe.config_shape:
        shape = dict(recipe.config_shape)
        cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
    else:
        try:
            cfg = AutoConfig.from_pretrained(resolve_model(recipe.model))
        except OSError:
            raise SystemExit(f"{recipe.model}: config.json unreachable and the recipe has no config_shape") from None
    cfg.vocab_size = max(int(cfg.vocab_size), len(tokenizer))
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.use_cache = False
    return cfg


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_dtype(recipe) -> torch.dtype:
    """The recipe's dtype on CUDA; float32 on CPU (bf16 matmuls are slow there)."""
    from train.modeling import torch_dtype

    if not torch.cuda.is_available() or recipe.dtype == "auto":
        return torch.float32
    return torch_dtype(recipe.dtype)


def random_model(auto_cls, cfg, dtype: torch.dtype, attn_implementation: str | None = "sdpa", **kwargs):
    """A random-weight model built directly on the run device (a 7B on CPU would take minutes)."""
    torch.manual_seed(0)
    with device():
        return auto_cls.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation, **kwargs)


# ----------------------------------------------------------------------------- measuring
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float:
    """Peak CUDA memory since the last :func:`reset_peak`; on CPU the process max RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def peak_flops(override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def write_json(path: str | None, data: dict) -> None:
    if path:
        from mood_data.atomic import write_json as atomic_write

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
