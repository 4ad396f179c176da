"""Perplexity of a conversation under the causal-LM adapter, computed in position chunks.

``ppl = exp(mean token NLL)`` over the whole conversation, or (``assistant_only``) over the
tokens of the assistant turns: the text after ``<start_of_turn>model\\n`` up to and including
the closing ``<end_of_turn>``. Higher perplexity = more unsafe / OOD (no sign flip needed).

Token log-likelihoods come from the final hidden states through ``lm_head`` on chunks of
``chunk_size`` positions, so a ``[batch, length, vocab]`` float tensor is never materialised
(for a 256k-vocabulary Gemma at 2k tokens that alone would be 2 GB per row).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .detectors.perplexity import perplexity_from_nll
from .forward import Encoded, SharedBackbone, collate, length_batches, pad_id

def target_mask(attention_mask: torch.Tensor, lm_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which positions count as NLL targets: real tokens (optionally inside ``lm_mask``) whose
    previous position is also real (so the first real token under left padding is skipped)."""
    src = attention_mask.bool()
    tgt = src if lm_mask is None else (lm_mask.bool() & src)
    valid = torch.zeros_like(tgt)
    valid[:, 1:] = tgt[:, 1:] & src[:, :-1]
    return valid


def chunked_token_nll(hidden: torch.Tensor, lm_head: torch.nn.Module, input_ids: torch.Tensor,
                      targets_valid: torch.Tensor, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (sum of token NLL, number of targets), float64.

    Position ``t`` predicts token ``t+1``; it counts when ``targets_valid[:, t+1]``. Logits
    exist for at most ``chunk_size`` positions at a time.
    """
    b, n, _ = hidden.shape
    nll_sum = torch.zeros(b, dtype=torch.float64, device=hidden.device)
    count = torch.zeros(b, dtype=torch.float64, device=hidden.device)
    for s in range(0, n - 1, chunk_size):
        e = min(s + chunk_size, n - 1)
        logits = lm_head(hidden[:, s:e]).float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, s + 1:e + 1].flatten(),
                                                reduction="none").view(b, e - s)
        m = targets_valid[:, s + 1:e + 1].to(torch.float64)
        nll_sum += (nll.double() * m).sum(1)
        count += m.sum(1)
    return nll_sum, count


def full_logits_nll(logits: torch.Tensor, input_ids: torch.Tensor, targets_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (mood-bench way): the same sums from whole-sequence ``[b, n, vocab]`` logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1).double()
    m = targets_valid[:, 1:].to(torch.float64)
    return -(tok * m).sum(1), m.sum(1)


@torch.no_grad()
def lm_nll(backbone: SharedBackbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           lm_mask: torch.Tensor | None = None, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """One LM forward (adapter ``lm``) + chunked NLL for one padded batch."""
    hidden = backbone.lm_hidden(input_ids, attention_mask)
    dev = backbone.head_device  # the last shard under device_map=auto (== the input device otherwise)
    valid = target_mask(attention_mask, lm_mask)
    return chunked_token_nll(hidden.to(dev), backbone.lm_head, input_ids.to(dev), valid.to(dev), chunk_size)


def token_nll_pass(backbone: SharedBackbone, encoded: Encoded, *, batch_size: int, chunk_size: int = 256,
                   sort: bool = True, desc: str = "LM forward") -> tuple[np.ndarray, np.ndarray]:
    """THE LM pass: per row (sum of token NLL, number of scored tokens) in the original order
    (``encoded.lm_mask``, if present, selects the scored tokens)."""
    n = len(encoded.input_ids)
    nll = np.zeros(n, dtype=np.float64)
    cnt = np.zeros(n, dtype=np.float64)
    from .parallel import run_batches

    pad, device = pad_id(backbone), backbone.device

    def compute(index: np.ndarray):
        batch = collate(encoded, index, pad)
        m = batch.get("lm_mask")
        s, c = lm_nll(backbone, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                      None if m is None else m.to(device), chunk_size)
        return s.cpu().numpy(), c.cpu().numpy()

    # data-parallel under a multi-process launch (eval.engine.parallel): every rank gets every batch
    for index, (s, c) in run_batches(length_batches(encoded.lengths, batch_size, sort=sort), compute, desc=desc):
        nll[index], cnt[index] = s, c
    return nll, cnt


def perplexity_pass(backbone: SharedBackbone, encoded: Encoded, *, batch_size: int, chunk_size: int = 256,
                    sort: bool = True, desc: str = "LM forward") -> np.ndarray:
    """Perplexity of every row in the original order (the LM pass read by the ``ppl`` detector)."""
    return perplexity_from_nll(*token_nll_pass(backbone, encoded, batch_size=batch_size, chunk_size=chunk_size,
                                               sort=sort, desc=desc))


def perplexities(backbone: SharedBackbone, tokenizer, conversations: Sequence[str], *, max_length: int,
                 batch_size: int = 8, chunk_size: int = 256, assistant_only: bool = False) -> np.ndarray:
    """Convenience: encode + :func:`perplexity_pass`."""
    from .forward import encode

    enc = encode(tokenizer, conversations, max_length, assistant_only=assistant_only)
    return perplexity_pass(backbone, enc, batch_size=batch_size, chunk_size=chunk_size)


__all__ = [
    "chunked_token_nll", "full_logits_nll", "lm_nll", "perplexities", "perplexity_pass", "target_mask",
    "token_nll_pass",
]
