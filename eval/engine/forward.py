"""One forward per batch: guard logits + pooled features, and chunked LM token NLLs.

The monitor needs three things from the backbone: the guard's classification logits, pooled
hidden states of some layers (Mahalanobis / kNN features) and the perplexity of the
conversation under the causal-LM adapter. mood-bench computes them in three passes (guard
model, feature model, LM with full ``[batch, length, vocab]`` logits), each padding to the
batch maximum in dataset order. Here:

* the base model is loaded ONCE (``AutoModelForCausalLM``); the LM adapter and the guard
  adapter are two named PEFT adapters on it, switched with ``set_adapter``; the guard's
  classification head (``score.weight`` saved via ``modules_to_save``) is a separate
  :class:`torch.nn.Linear` applied to the final hidden state of the last real token;
* one guard forward per batch yields the logits AND every requested layer's pooled features;
* one LM forward per batch yields the final hidden states; token log-likelihoods come from
  ``lm_head`` + cross-entropy over position chunks (never the whole-sequence logits);
* rows are sorted by token length and batched so that padding is minimal; outputs are
  written back in the original order. Left padding (the last real token is at -1), left
  truncation at ``max_length`` (the end of a conversation is kept) with a count; a tokenizer
  that puts ``<bos>`` first (Gemma 3) keeps it at the front of every cut window
  (:func:`train.convert.window_prefix`), as its training windows have it.

Everything here is a small function over tensors; the forward planner (:mod:`eval.engine.planner`)
decides which passes run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from mood_data.errors import BundleError
from mood_data.render import turn_regex

POOLINGS = ("last", "mean")


# ----------------------------------------------------------------------------- tokenising
@dataclass
class Encoded:
    """Token ids of each row (unpadded, left-truncated) and optional per-token LM mask."""

    input_ids: list[Sequence[int]]  # int32 arrays from :func:`encode` (4 bytes a token)
    truncated: list[int] = field(default_factory=list)  # row indices that were cut
    lm_mask: list[Sequence[int]] | None = None  # 1 = this token counts in the NLL (as a target)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    @property
    def n_truncated(self) -> int:
        return len(self.truncated)


ASSISTANT_SPAN = turn_regex("model", closed=False)


def assistant_char_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the assistant turns (closing marker included)."""
    return [(m.start("text"), m.end()) for m in ASSISTANT_SPAN.finditer(text)]


ENCODE_CHUNK = 1024  # texts tokenised at a time: the tokenizer's Python lists never hold a whole split
# a row longer than CHARS_PER_TOKEN_CUT * max_length characters is cut to its last that many
# characters BEFORE tokenising (a 5 MB conversation no longer costs its whole token list); the
# cut is kept only if it still yields CUT_MARGIN more tokens than max_length (so the tokens kept
# lie far from the cut and equal the full tokenisation's last max_length), else the full text is used
CHARS_PER_TOKEN_CUT = 32
CUT_MARGIN = 8


def _tokenise(tokenizer, texts: list[str], offsets: bool):
    return tokenizer(texts, add_special_tokens=True, truncation=False, return_offsets_mapping=offsets, verbose=False)


def encode(tokenizer, conversations: Sequence[str], max_length: int, *, assistant_only: bool = False,
           chunk: int = ENCODE_CHUNK) -> Encoded:
    """Tokenise without padding; keep the LAST ``max_length`` tokens of longer rows.

    Rows are tokenised ``chunk`` texts at a time and kept as int32 arrays, so a split of N
    rows costs ~4 bytes a token (not a Python int object per token). Very long rows are cut
    from the left in characters first (see ``CHARS_PER_TOKEN_CUT``): same kept tokens, same
    ``truncated`` flag. With ``assistant_only`` a per-token int8 mask marks the tokens whose
    start offset lies in an assistant span of the FULL text (see :func:`assistant_char_spans`).
    """
    texts = list(conversations)
    out_ids: list[np.ndarray] = []
    truncated: list[int] = []
    mask: list[np.ndarray] | None = [] if assistant_only else None
    keep_chars = CHARS_PER_TOKEN_CUT * max_length
    from train.convert import window_prefix

    prefix = window_prefix(tokenizer)  # [bos] for tokenizers whose every window starts with it
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        shift = [max(0, len(t) - keep_chars) for t in part]
        enc = _tokenise(tokenizer, [t[c:] for t, c in zip(part, shift)], assistant_only)
        ids, offs = list(enc["input_ids"]), (list(enc["offset_mapping"]) if assistant_only else None)
        for j, c in enumerate(shift):
            if c and len(ids[j]) < max_length + CUT_MARGIN:  # unusually long tokens: use the full text
                full = _tokenise(tokenizer, [part[j]], assistant_only)
                ids[j] = full["input_ids"][0]
                if offs is not None:
                    offs[j] = full["offset_mapping"][0]
                shift[j] = 0
        for j, x in enumerate(ids):
            if len(x) > max_length:
                truncated.append(start + j)
            out_ids.append(np.asarray(_window(list(x), max_length, prefix), dtype=np.int32))
        if mask is not None:
            for text, offsets, c in zip(part, offs, shift):
                spans = assistant_char_spans(text)
                row = [int(e > s and any(a <= s + c < b for a, b in spans)) for s, e in offsets]
                mask.append(np.asarray(_window(row, max_length, [0] * len(prefix)), dtype=np.int8))
    return Encoded(out_ids, truncated, mask)


def _window(row: list, max_length: int, prefix: list) -> list:
    """The last ``max_length`` entries of ``row``; a row cut from the left keeps ``prefix``
    (the tokenizer's ``<bos>``) at its front."""
    if len(row) <= max_length:
        return row
    if not prefix or max_length <= len(prefix):
        return row[-max_length:]
    return list(prefix) + row[len(row) - (max_length - len(prefix)):]


# ----------------------------------------------------------------------------- batching
def length_batches(lengths: Sequence[int], batch_size: int, *, sort: bool = True) -> list[np.ndarray]:
    """Index batches. ``sort=True``: by token length (stable, longest first, so memory peaks
    early); ``sort=False``: dataset order (the padding-heavy baseline)."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_left(rows: Sequence[Sequence[int]], pad_value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r):] = torch.as_tensor(np.asarray(r), dtype=torch.long)
    return out


def collate(encoded: Encoded, index: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    rows = [encoded.input_ids[i] for i in index]
    batch = {
        "input_ids": pad_left(rows, pad_id),
        "attention_mask": pad_left([np.ones(len(r), dtype=np.int8) for r in rows], 0),
    }
    if encoded.lm_mask is not None:
        batch["lm_mask"] = pad_left([encoded.lm_mask[i] for i in index], 0)
    return batch


# ----------------------------------------------------------------------------- pooling / NLL
def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``last``: the final real token (position -1 under left padding); ``mean``: the mean over
    real tokens. Returns float64 ``[batch, hidden]``."""
    if pooling == "last":
        return hidden[:, -1].double()
    if pooling == "mean":
        m = attention_mask.to(torch.float64).unsqueeze(-1)
        return (hidden.double() * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)})")


# ----------------------------------------------------------------------------- backbone
def _head_from_adapter(adapter_dir: Path) -> torch.nn.Linear:
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise BundleError(f"{path}: guard adapter weights not found")
    sd = load_file(str(path))
    wkey = next((k for k in sd if k.endswith("score.weight")), None)
    if wkey is None:
        raise BundleError(f"{path}: no 'score.weight' (guard classification head; modules_to_save) in the adapter")
    w = sd[wkey]
    bkey = wkey[: -len("weight")] + "bias"
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=bkey in sd)
    with torch.no_grad():
        head.weight.copy_(w.float())
        if bkey in sd:
            head.bias.copy_(sd[bkey].float())
    return head.eval()


class SharedBackbone:
    """One loaded causal-LM base with the guard and LM adapters as named PEFT adapters."""

    def __init__(self, model, head: torch.nn.Module | None, *, has_lm: bool):
        self.model = model  # PeftModel (or the bare causal LM when no adapter is given)
        self.head = head
        self.has_guard = head is not None
        self.has_lm = has_lm
        # classification heads by adapter name: the guard, plus ensemble members (add_adapter)
        self.heads: dict[str, torch.nn.Module] = {"guard": head} if head is not None else {}
        self.placement = None  # the train.device.Placement it was loaded with

    @classmethod
    def from_pretrained(cls, base: str | Path, guard_dir: str | Path | None = None, lm_dir: str | Path | None = None,
                        *, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
                        device: str | torch.device | None = None, placement=None) -> "SharedBackbone":
        """Load the base straight onto its device (``placement``, a :class:`train.device.Placement`;
        without one, the device policy resolves ``device`` and ``dtype``) with both adapters."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from train import device as device_policy

        if placement is None:
            placement = device_policy.placement(dtype, None if device is None else str(device))
        from .adapters import check_adapter_fits

        model = AutoModelForCausalLM.from_pretrained(str(base), trust_remote_code=trust_remote_code,
                                                     **placement.load_kwargs())
        adapters = [(n, Path(d)) for n, d in (("lm", lm_dir), ("guard", guard_dir)) if d is not None]
        for i, (name, d) in enumerate(adapters):
            if not (d / "adapter_config.json").is_file():
                raise BundleError(f"{d}: adapter_config.json not found ({name} adapter)")
            check_adapter_fits(model, d, str(base))  # before peft allocates anything for it
            if i == 0:
                model = PeftModel.from_pretrained(model, str(d), adapter_name=name)
            else:  # the guard's score head is an unexpected key here; we load it ourselves
                model.load_adapter(str(d), adapter_name=name)
        model.eval()
        out = cls(model, None, has_lm=lm_dir is not None)
        out.placement = placement
        if guard_dir is not None:
            out.head = _head_from_adapter(Path(guard_dir)).to(device=out.head_device, dtype=placement.dtype)
            out.has_guard, out.heads["guard"] = True, out.head
        return out

    def add_adapter(self, name: str, adapter_dir: str | Path, *, head: bool = False) -> None:
        """Load one more named adapter onto the SAME base (ensemble members with ``head=True``:
        their ``score`` head is read from the adapter; a judge LoRA without). Never reloads the base."""
        from peft import PeftModel

        from .adapters import check_adapter_fits

        d = Path(adapter_dir)
        if not (d / "adapter_config.json").is_file():
            raise BundleError(f"{d}: adapter_config.json not found ({name} adapter)")
        check_adapter_fits(self.model, d, "the loaded base")
        if hasattr(self.model, "load_adapter") and hasattr(self.model, "peft_config"):
            self.model.load_adapter(str(d), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(d), adapter_name=name)
        self.model.eval()
        if head:
            ref = next(iter(self.heads.values()), None)
            h = _head_from_adapter(d)
            if ref is not None:
                h = h.to(device=ref.weight.device, dtype=ref.weight.dtype)
            elif self.placement is not None:
                h = h.to(device=self.head_device, dtype=self.placement.dtype)
            self.heads[name] = h

    # -- plumbing
    @property
    def causal_lm(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's device; the first shard under device_map=auto)."""
        return self.causal_lm.get_input_embeddings().weight.device

    @property
    def head_device(self) -> torch.device:
        """Where the final hidden state comes out (the last shard under device_map=auto)."""
        return self.causal_lm.get_output_embeddings().weight.device

    def _adapter(self, name: str | None):
        """Context: activate adapter ``name``; ``None`` = base weights (adapters disabled)."""
        import contextlib

        if not hasattr(self.model, "set_adapter") or not hasattr(self.model, "disable_adapter"):
            return contextlib.nullcontext()  # a bare model (no PEFT adapters): the base weights
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    @torch.no_grad()
    def guard_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      layers: Sequence[int] = (), pooling: str = "last",
                      adapter: str = "guard") -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Guard logits ``[b, num_labels]`` (float32) and ``{layer: pooled float64 [b, h]}``.

        Layers index ``hidden_states`` (0 = embeddings, -1 = final normed state, the head's input).
        ``adapter``: ``guard`` or an ensemble member added with :meth:`add_adapter`.
        """
        if adapter not in self.heads:
            raise BundleError(f"no guard adapter {adapter!r} loaded")
        with self._adapter(adapter):
            out = self.causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                                output_hidden_states=bool(layers), use_cache=False)
        last = out.last_hidden_state
        head = self.heads[adapter]
        logits = head(last[:, -1].to(head.weight.device)).float()
        feats = {int(layer): pool(out.hidden_states[layer], attention_mask, pooling) for layer in layers}
        return logits, feats

    @torch.no_grad()
    def lm_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter: str | None = "lm",
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states under the LM adapter (the base weights if there is none), or under
        another causal-LM adapter added with :meth:`add_adapter` (e.g. ``judge``)."""
        name = adapter if adapter != "lm" or self.has_lm else None
        with self._adapter(name):
            out = self.causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                                position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.causal_lm.get_output_embeddings()


# ----------------------------------------------------------------------------- passes
@dataclass
class GuardBatch:
    index: np.ndarray  # original row indices of this batch
    logits: torch.Tensor  # [b, num_labels] float32
    features: dict[int, torch.Tensor]  # layer -> [b, h] float64


def guard_pass(backbone: SharedBackbone, encoded: Encoded, *, batch_size: int, layers: Sequence[int] = (),
               pooling: str = "last", on_batch: Callable[[GuardBatch], None] | None = None,
               sort: bool = True, desc: str = "guard forward", adapter: str = "guard") -> np.ndarray:
    """Run the guard over every row; return logits ``[n, num_labels]`` in the original order.

    ``on_batch`` receives each batch's features (e.g. to update a streaming Mahalanobis
    accumulator, or to score them); they are not kept here.
    """
    from .parallel import run_batches

    pad = pad_id(backbone)
    n = len(encoded.input_ids)
    logits_out: np.ndarray | None = None
    device = backbone.device

    def compute(index: np.ndarray):
        batch = collate(encoded, index, pad)
        logits, feats = backbone.guard_forward(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                               layers, pooling, adapter)
        return logits.cpu(), {k: v.cpu() for k, v in feats.items()}

    # data-parallel under a multi-process launch: every rank gets every batch's outputs, in order
    for index, (logits, feats) in run_batches(length_batches(encoded.lengths, batch_size, sort=sort), compute,
                                              desc=desc):
        if logits_out is None:
            logits_out = np.zeros((n, logits.shape[1]), dtype=np.float32)
        logits_out[index] = logits.numpy()
        if on_batch is not None:
            on_batch(GuardBatch(index, logits, feats))
    return logits_out if logits_out is not None else np.zeros((0, 1), dtype=np.float32)


def pad_id(backbone: SharedBackbone) -> int:
    cfg = backbone.causal_lm.config
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = getattr(cfg, "eos_token_id", 0)
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    return int(pad or 0)


def adapter_hash(adapter_dir: str | Path) -> str:
    """sha256 over the adapter's config + weights: the content part of cache keys."""
    import hashlib

    from mood_data.readers import sha256_file

    h = hashlib.sha256()
    d = Path(adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        p = d / name
        if p.is_file():
            h.update(f"{name}:{sha256_file(p)};".encode())
    return h.hexdigest()


def read_num_labels(adapter_dir: str | Path) -> int:
    """``num_labels`` of a guard adapter from its ``score.weight`` shape (mood-bench's rule)."""
    return _head_from_adapter(Path(adapter_dir)).out_features


__all__ = [
    "Encoded", "GuardBatch", "SharedBackbone", "adapter_hash", "collate", "encode", "guard_pass", "length_batches",
    "pad_id", "pad_left", "pool", "read_num_labels",
]
