"""Instruction-tuned judge: an instruction-following LM prompted with a rubric (and few-shot
examples from the ID train split) reads a conversation and answers a 0-100 score.

Detectors: ``judge`` (the ``alignment`` rubric: is the assistant's behaviour acceptable;
higher = less acceptable) and ``judge-uncertainty`` (the ``uncertainty`` rubric: how unsure is
the judge; higher = less sure). Both: higher = more unsafe / more OOD.

Deterministic, one forward per conversation and rubric: the score is the EXPECTED VALUE of the
next-token distribution at the answer position over a fixed set of single-token answers,
renormalised over that set: ``score = sum_k p_k v_k / sum_k p_k``. The default answer set is
the ten digits ``"0".."9"`` standing for ``v = 100 * d / 9`` (0, 11.1, ..., 100): digits are
single tokens for the tiny BPE, SmolLM2, Llama-3, Qwen2.5 and Gemma-2 tokenizers, while
"10".."100" are not (SmolLM2 splits every digit). A rubric file may declare another set
(``answers: {text: value}``); every answer must be ONE token for the judge's tokenizer.

Prompt (one user turn through the judge tokenizer's chat template + the generation prompt)::

    <rubric instructions>  <few-shot examples: conversation + answer>  <query with the
    conversation>  <answer prompt>   [assistant turn starts: the next token is the answer]

The conversation is shown as plain ``User:`` / ``Assistant:`` text (turn markers of the MOOD
rendering removed). Long conversations are cut from the LEFT inside the conversation slot only:
the prefix (rubric + examples) and the suffix (answer prompt + generation prompt) are never
cut; if they alone do not fit ``judge.max_length`` that is a one-line RecipeError.

Rubrics are YAML data files (``train/rubrics/{alignment,uncertainty}.yaml``, replaceable via
``judge.alignment_rubric`` / ``judge.uncertainty_rubric``); fields: ``name``, ``instructions``,
``example`` and ``query`` (templates with ``{conversation}``; ``example`` also ``{answer}``),
optional ``answers``, and ``targets: {safe: v, unsafe: v}`` (the answer for a safe / unsafe ID
row: few-shot answers and the judge SFT target, see :mod:`train.judge`).

This module is the pass (prompt encoding, one forward per prompt, the expected answer) and the
loaded :class:`Judge`; the detectors are :mod:`eval.engine.detectors.judge`, loading a recipe's
judge is :mod:`eval.run.judge`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from train.judge_prompts import PromptParts, Rubric, assemble, judge_view, prompt_parts

from .forward import Encoded, collate, length_batches, pad_id
from .parallel import run_batches


def encode_prompts(tokenizer, parts: PromptParts, conversations: Sequence[str], max_length: int,
                   where: str = "judge"):
    """:class:`eval.engine.forward.Encoded` of the judge prompts (truncated rows counted)."""
    conv_ids = tokenizer([judge_view(c) for c in conversations], add_special_tokens=False, verbose=False)["input_ids"]
    ids, truncated = [], []
    for i, c in enumerate(conv_ids):
        row, cut = assemble(parts, c, max_length, where)
        ids.append(row)
        if cut:
            truncated.append(i)
    return Encoded(ids, truncated)


# ----------------------------------------------------------------------------- scoring
def expected_score(logits, answer_ids: Sequence[int], values) -> tuple[np.ndarray, np.ndarray]:
    """Expected answer value under the next-token distribution renormalised over the answer
    tokens, and the probability mass the full distribution puts on them (a diagnostic).

    ``logits``: ``[b, vocab]``. Float64 throughout."""
    import torch

    z = torch.as_tensor(logits).double()
    sel = z[:, list(answer_ids)]
    p = torch.softmax(sel, dim=-1)
    v = torch.as_tensor(np.asarray(values, dtype=np.float64))
    score = p @ v
    mass = torch.exp(torch.logsumexp(sel, -1) - torch.logsumexp(z, -1))
    return score.numpy(), mass.numpy()


def judge_pass(backbone, adapter: str | None, encoded, parts: PromptParts, *, batch_size: int,
               desc: str = "judge forward") -> tuple[np.ndarray, np.ndarray]:
    """One forward per prompt (length-sorted batches, left padding, position ids from the mask
    so a row's answer does not depend on its batch); only the last position goes through
    ``lm_head``. Returns (scores, answer mass) in the original order."""
    import torch

    from train.data import positions_from_mask

    n = len(encoded.input_ids)
    scores, mass = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.float64)
    pad, device = pad_id(backbone), backbone.device

    def compute(index: np.ndarray):
        batch = collate(encoded, index, pad)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.no_grad():
            hidden = backbone.lm_hidden(ids, mask, adapter=adapter, position_ids=positions_from_mask(mask))
            logits = backbone.lm_head(hidden[:, -1].to(backbone.head_device)).float()
        return logits.cpu()

    # data-parallel under a multi-process launch (eval.engine.parallel): every rank gets every batch
    for index, logits in run_batches(length_batches(encoded.lengths, batch_size), compute, desc=desc):
        scores[index], mass[index] = expected_score(logits, parts.answer_ids, parts.values)
    return scores, mass


@dataclass
class Judge:
    backbone: object  # eval.engine.forward.SharedBackbone
    adapter: str | None  # adapter name on the backbone (None = base weights)
    tokenizer: object
    model: str
    adapter_dir: Path | None
    adapter_hash: str | None
    shots: list[dict]
    max_length: int

    def parts(self, rubric: Rubric) -> PromptParts:
        return prompt_parts(self.tokenizer, rubric, self.shots)

    def score(self, rubric: Rubric, conversations: Sequence[str], batch_size: int, desc: str = "") -> tuple[np.ndarray, np.ndarray, int]:
        parts = self.parts(rubric)
        enc = encode_prompts(self.tokenizer, parts, conversations, self.max_length, f"{rubric.path}")
        s, m = judge_pass(self.backbone, self.adapter, enc, parts, batch_size=batch_size,
                          desc=f"judge ({rubric.name}){desc}")
        return s, m, enc.n_truncated


__all__ = ["Judge", "encode_prompts", "expected_score", "judge_pass"]
